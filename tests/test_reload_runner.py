"""The command runners of the restart lifecycle, with real shell scripts.

``run_check`` (``reload_check``) returns or fails within its timeout whatever the
command does: a child that daemonises holding stdout open, gigabytes of output, a
non-zero exit with terminal escapes in its output, a missing command, a command
that never ends. ``run_restart`` (``bundle.reload``) returns only once the
command's whole process group is gone, never kills it before its hard cap, and on
a stop request waits for it briefly and says whether it still runs. Each call
runs in a thread joined with a generous bound: that bound only guards against a
hang, it measures nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from sakeystate import restart
from sakeystate.errors import ReloadFailed
from sakeystate.restart import OUTPUT_TAIL, Stop, StopRequested, run_check, run_restart

# A hang guard, far above the runner's own timeout + 1 s.
HANG_GUARD = 20.0


def run_guarded(argv: tuple[str, ...], timeout: float) -> ReloadFailed | None:
    """``run_check`` in a thread; the test fails if it has not returned in time."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            run_check(argv, timeout)
        except BaseException as exc:  # handed to the test thread, asserted there
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout + HANG_GUARD)
    assert not thread.is_alive(), f"run_check({argv!r}) hung past its timeout"
    result = outcome[0]
    assert result is None or isinstance(result, ReloadFailed), result
    return result


@pytest.fixture
def pidfile(tmp_path: Path) -> Iterator[Path]:
    """Where a script writes the PID of the daemon it starts; the daemon is killed after."""
    path = tmp_path / "daemon.pid"
    yield path
    if path.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(path.read_text()), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _dies(pid: int) -> bool:
    """Whether ``pid`` is gone (or a zombie) soon: SIGKILL is delivered asynchronously."""
    for _ in range(100):
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_success_with_a_daemon_holding_stdout_returns(pidfile: Path) -> None:
    script = f"sleep 60 & echo $! > {pidfile}; echo reloaded"
    assert run_guarded(("sh", "-c", script), timeout=30) is None
    # A daemon the reload started on purpose is left running.
    assert _alive(int(pidfile.read_text()))


def test_timeout_with_a_detached_daemon_holding_stdout_fails_in_time(pidfile: Path) -> None:
    """The daemon escapes the killed process group; the runner must not wait for its EOF."""
    script = f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 60' & sleep 60"
    failure = run_guarded(("sh", "-c", script), timeout=1)
    assert failure is not None and "timed out after 1s" in str(failure)


def test_timeout_kills_the_command_and_its_process_group(pidfile: Path) -> None:
    script = f"sleep 60 & echo $! > {pidfile}; sleep 60"
    failure = run_guarded(("sh", "-c", script), timeout=1)
    assert failure is not None and "timed out after 1s; it will be retried" in str(failure)
    assert _dies(int(pidfile.read_text()))


def test_huge_output_keeps_only_its_tail() -> None:
    tracemalloc.start()
    try:
        failure = run_guarded(("sh", "-c", "yes | head -c 200000000; echo last; exit 3"), 120)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert failure is not None
    message = str(failure)
    assert "exited 3: y / y / last; it will be retried" in message
    assert len(message) < 2 * OUTPUT_TAIL
    assert peak < 16 * 1024 * 1024, f"{peak} bytes traced while reading 200 MB of output"


def test_non_zero_exit_shows_the_last_lines_escaped() -> None:
    script = "echo first; printf 'bad \\033]0;owned\\007\\033[2J\\rdone\\n'; exit 2"
    failure = run_guarded(("sh", "-c", script), timeout=30)
    assert failure is not None
    message = str(failure)
    assert "exited 2: first / bad \\x1b]0;owned\\x07\\x1b[2J\\x0ddone" in message
    assert "\x1b" not in message and "\r" not in message


def test_command_not_found_is_a_reload_failure(tmp_path: Path) -> None:
    failure = run_guarded((str(tmp_path / "no-such-reload"),), timeout=5)
    assert failure is not None and "could not start: No such file or directory" in str(failure)


def test_success_prints_nothing_and_returns() -> None:
    assert run_guarded(("sh", "-c", "echo ok; exit 0"), timeout=30) is None


# --- run_restart: bundle.reload ---------------------------------------------------------


def test_a_restart_returns_only_once_its_whole_process_group_is_gone(pidfile: Path) -> None:
    # The command exits at once; a child it left in its group still restarts something.
    script = f"sleep 2 & echo $! > {pidfile}; exit 0"
    run_restart(("sh", "-c", script), timeout=30, stop=Stop())
    assert not _alive(int(pidfile.read_text()))


def test_a_restart_that_detaches_a_daemon_into_its_own_session_is_not_waited_for(
    pidfile: Path,
) -> None:
    """What `systemctl restart` leaves behind is systemd's; a daemon the command started
    in a session of its own is not part of the restart."""
    script = f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 60' & sleep 0.2; exit 0"
    run_restart(("sh", "-c", script), timeout=30, stop=Stop())
    assert _alive(int(pidfile.read_text()))


def test_a_restart_past_reload_timeout_is_waited_for_then_fails(pidfile: Path) -> None:
    script = f"echo $$ > {pidfile}; sleep 2"
    with pytest.raises(ReloadFailed, match=r"took \d+\.\ds, more than reload_timeout \(1s\)"):
        run_restart(("sh", "-c", script), timeout=1, stop=Stop(), cap=60)
    assert not _alive(int(pidfile.read_text()))  # it ran to its end, unkilled


def test_a_stop_request_waits_for_the_restart_then_says_it_still_runs(
    pidfile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(restart, "STOP_GRACE", 0.5)
    stop = Stop()
    stop.requested = True
    script = f"echo $$ > {pidfile}; exec sleep 60"
    with pytest.raises(StopRequested) as raised:
        run_restart(("sh", "-c", script), timeout=30, stop=stop)
    assert raised.value.alive
    assert _alive(int(pidfile.read_text()))  # never killed


def test_a_restart_failure_shows_its_last_lines() -> None:
    with pytest.raises(ReloadFailed, match="exited 3: refused: unit not found; it will be retried"):
        run_restart(("sh", "-c", "echo refused: unit not found; exit 3"), timeout=30, stop=Stop())
