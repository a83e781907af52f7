"""A ``bundle.reload`` for the tests: ``reload_probe.py LOG NAME PAUSE``.

Appends ``start NAME TIME PID``, sleeps PAUSE seconds, appends ``end NAME TIME``;
each line is one O_APPEND write, so probes of several hosts share one log.
"""

import os
import sys
import time


def note(log: str, text: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


if __name__ == "__main__":
    log, name, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
    note(log, f"start {name} {time.time():.6f} {os.getpid()}\n")
    time.sleep(pause)
    note(log, f"end {name} {time.time():.6f}\n")
