"""``bundle.reload`` of the end-to-end cluster: ``unitctl.py SOCKET restart``, like
``systemctl restart kube-apiserver``.

It asks the control plane's supervisor (e2e/supervisor.py) to run the job and waits
for the job's end: exit 0 when the supervisor says ``ok``, 1 otherwise. The
apiserver process belongs to the supervisor, not to this command, so sakeystate's
reload runner (own session, killed on timeout) can never take the apiserver down
with it: the restart is detached, as a systemd job is.
"""

from __future__ import annotations

import socket
import sys


def request(path: str, command: str, timeout: float = 300.0) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(command.encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply.decode().strip()


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: {argv[0]} SOCKET start|stop|restart|status", file=sys.stderr)
        return 1
    try:
        reply = request(argv[1], argv[2])
    except OSError as exc:
        print(f"unitctl: {argv[1]}: {exc}", file=sys.stderr)
        return 1
    print(reply)
    return 0 if reply.startswith(("ok", "running", "stopped")) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
