# Copyright (c) osimage.builder contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""A TCP server on the host's 127.0.0.1 that answers pong.

Writes its port to argv[1] (atomically), counts connections in argv[1].count, exits after 120 s.
"""

from __future__ import annotations

import os
import socket
import sys
import time


def main() -> None:
    port_file = sys.argv[1]
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(1)
    with open(port_file + ".tmp", "w", encoding="ascii") as f:
        f.write(str(server.getsockname()[1]))
    os.rename(port_file + ".tmp", port_file)
    deadline = time.monotonic() + 120
    count = 0
    while time.monotonic() < deadline:
        try:
            conn, _addr = server.accept()
        except OSError:
            continue
        count += 1
        with conn:
            conn.sendall(b"pong\n")
        with open(port_file + ".count", "w", encoding="ascii") as f:
            f.write(str(count))


if __name__ == "__main__":
    main()
