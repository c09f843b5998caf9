#!/usr/bin/env bash
# End to end, the way AWX runs it: build-image.yml through ansible-runner on a
# private data directory, then the same run again, which must change nothing
# and be quick, then a check-mode run on a fresh path, which must write nothing.
set -eux

COLLECTION="${ANSIBLE_COLLECTIONS_PATH%%:*}/ansible_collections/osimage/builder"
test -f "$COLLECTION/build-image.yml"
WORK="$(mktemp -d /var/tmp/osimage-e2e.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
PDD="$WORK/pdd"
OUT="$WORK/output"
mkdir -p "$PDD/env" "$PDD/inventory"
ln -s "$COLLECTION" "$PDD/project"
printf 'localhost ansible_connection=local ansible_python_interpreter=%s\n' "$(command -v python)" > "$PDD/inventory/hosts"
cat > "$PDD/env/envvars" <<EOV
ANSIBLE_COLLECTIONS_PATH: "$ANSIBLE_COLLECTIONS_PATH"
EOV
cat > "$PDD/env/extravars" <<EOV
osimage_output_dir: "$OUT"
osimage_boot_accel: tcg
EOV

ansible-runner run "$PDD" -p build-image.yml --ident first
start=$(date +%s)
ansible-runner run "$PDD" -p build-image.yml --ident again
rerun_seconds=$(( $(date +%s) - start ))

python "$(dirname "$0")/check_artifacts.py" "$PDD/artifacts" "$OUT" "$rerun_seconds"

# Bad input stops the play before anything is written, naming the variable.
bad_input() {
  local expect="$1"; shift
  if ansible-playbook "$COLLECTION/build-image.yml" -e "osimage_output_dir=$WORK/bad-output" "$@" > "$WORK/bad.log" 2>&1; then
    echo "the play accepted $*"; exit 1
  fi
  grep -q -- "$expect" "$WORK/bad.log" || { cat "$WORK/bad.log"; echo "no '$expect' in the error"; exit 1; }
  test ! -e "$WORK/bad-output"
}
bad_input "osimage_layout" -e osimage_layout=uefi-only
bad_input "osimage_format" -e osimage_format=iso
bad_input "osimage_size: 512MiB is too small" -e osimage_size=512MiB
bad_input "osimage_size: 'lots' is not a size" -e osimage_size=lots

# Check mode on a fresh path: succeeds and writes nothing.
ansible-playbook "$COLLECTION/build-image.yml" --check -e "osimage_output_dir=$WORK/check-output" -e osimage_boot_accel=tcg
test ! -e "$WORK/check-output/debian-12.qcow2"
test -z "$(find "$WORK/check-output" -type f 2>/dev/null)"
