"""The only code that touches the bundle file and the two files beside it.

- ``<bundle>.lock``: an exclusive flock held by a converge, so two runs on one
  host never interleave.
- ``<bundle>.reload-pending``: written (durably) before a bundle write that needs
  a reload, removed once the reload succeeded. A run killed between the write
  and the reload, or a reload that failed, leaves it behind, and the next run
  reloads even though the bundle is already current.

Writes are atomic: a temporary file in the same directory, fsync, rename over
the bundle, fsync the directory. The bundle is therefore always either the old
or the new version. A symlink at the bundle path is never followed.

Another local user must not be able to take these files over: temporary
files get a random name and are created exclusively (O_EXCL, O_NOFOLLOW, mode
0600), and nothing is written into a directory that anyone but root or this
user could rename files in (group- or world-writable, sticky or not, or owned
by another user). ``preflight`` lists every such problem without writing,
with the very messages a write would raise, so ``plan`` predicts them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import grp
import os
import pwd
import secrets
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from sakeystate.errors import BundleError
from sakeystate.model import BundleObservation
from sakeystate.state import BundleConfig

LOCK_SUFFIX = ".lock"
PENDING_SUFFIX = ".reload-pending"


def _describe(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    return exc.strerror or str(exc)


def _directory_problem(setting: str, path: str) -> str | None:
    """Why files cannot be written safely beside ``path``, the value of ``setting``.

    ``setting`` is the state field the directory comes from (``bundle.path`` for
    the bundle, its lock, its reload marker and temporary files;
    ``bundle.jwks_path`` for the JWKS file), so each message names what to fix.
    """
    directory = os.path.dirname(path) or "."
    label = {"bundle.jwks_path": "JWKS directory", "--metrics-textfile": "metrics directory"}.get(
        setting, "bundle directory"
    )
    try:
        st = os.stat(directory)
    except (FileNotFoundError, NotADirectoryError):
        return f"{label} {directory} does not exist ({setting} {path})"
    except OSError as exc:
        return f"cannot stat {label} {directory}: {_describe(exc)} ({setting} {path})"
    if not stat.S_ISDIR(st.st_mode):
        return f"{label} {directory} does not exist ({setting} {path})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (
            f"{label} {directory} is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing to write there, another user "
            f"could replace what sakeystate writes ({setting} {path})"
        )
    if st.st_uid not in (0, os.geteuid()):
        return (
            f"{label} {directory} is owned by uid {st.st_uid}, neither root nor this user; "
            f"refusing to write there ({setting} {path})"
        )
    return None


def _lstat(path: str, what: str = "bundle") -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BundleError(f"cannot stat {what} {path}: {_describe(exc)}") from None


def _file_problem(path: str, st: os.stat_result, what: str = "bundle") -> str | None:
    """Why ``path`` (found as ``st``) must not be read or replaced: a symlink or not a file."""
    if stat.S_ISLNK(st.st_mode):
        return f"{what} {path} is a symlink; refusing to follow it"
    if not stat.S_ISREG(st.st_mode):
        return f"{what} {path} is not a regular file"
    return None


def _require(problem: str | None) -> None:
    if problem is not None:
        raise BundleError(problem)


def _check_regular(path: str, st: os.stat_result, what: str = "bundle") -> None:
    _require(_file_problem(path, st, what))


def _read(path: str, what: str) -> tuple[bytes | None, os.stat_result | None]:
    # Read-only: a missing directory is no bundle yet (e.g. `plan --observed` in review
    # CI); writers refuse it in `locked`/`write_atomic` with a clear error.
    if not os.path.isdir(os.path.dirname(path) or "."):
        return None, None
    st = _lstat(path)
    if st is None:
        return None, None
    _check_regular(path, st, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            return handle.read(), st
    except OSError as exc:
        raise BundleError(f"cannot read {what} {path}: {_describe(exc)}") from None


def observe(config: BundleConfig) -> BundleObservation:
    path = config.path
    content, st = _read(path, "bundle")
    marker = _read(path + PENDING_SUFFIX, "reload marker")[0]
    pending = marker is not None
    unowned = marker is not None and marker.startswith(UNOWNED)
    jwks = _read(config.jwks_path, "JWKS file")[0] if config.jwks_path else None
    if st is None:
        return BundleObservation(
            path, None, reload_pending=pending, jwks_content=jwks, reload_unowned=unowned
        )
    return BundleObservation(
        path=path,
        content=content,
        mode=stat.S_IMODE(st.st_mode),
        owner=_user_name(st.st_uid),
        group=_group_name(st.st_gid),
        reload_pending=pending,
        jwks_content=jwks,
        reload_unowned=unowned,
    )


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _owner_problems(config: BundleConfig) -> list[str]:
    return [
        f"bundle.{field} {name!r} is not a {kind} on this host"
        for field, name, kind, known in (
            ("owner", config.owner, "user", _user_exists),
            ("group", config.group, "group", _group_exists),
        )
        if name and not known(name)
    ]


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _ids(config: BundleConfig) -> tuple[int, int]:
    """The configured owner and group as ids; -1 where unset (keep what the file has)."""
    problems = _owner_problems(config)
    if problems:
        raise BundleError(problems[0])
    uid = pwd.getpwnam(config.owner).pw_uid if config.owner else -1
    gid = grp.getgrnam(config.group).gr_gid if config.group else -1
    return uid, gid


def preflight(config: BundleConfig) -> list[str]:
    """Every problem a converge's writes (bundle, lock, marker, JWKS) would hit; writes nothing.

    The messages are those ``locked`` and ``write`` raise, built by the same
    functions, so a plan can predict a converge's failure word for word.
    """
    problems: list[str] = []
    for setting, value, path, what in _written_files(config):
        problem = _directory_problem(setting, value) or _path_problem(path, what)
        if problem is not None and problem not in problems:
            problems.append(problem)
    return problems + _owner_problems(config)


def _written_files(config: BundleConfig) -> list[tuple[str, str, str, str]]:
    """(setting, its value, file, what the file is) for every file a converge may write."""
    files = [
        ("bundle.path", config.path, config.path + LOCK_SUFFIX, "lock"),
        ("bundle.path", config.path, config.path + PENDING_SUFFIX, "reload marker"),
        ("bundle.path", config.path, config.path, "bundle"),
    ]
    if config.jwks_path:
        files.append(("bundle.jwks_path", config.jwks_path, config.jwks_path, "JWKS file"))
    return files


def _path_problem(path: str, what: str) -> str | None:
    try:
        st = _lstat(path, what)
    except BundleError as exc:
        return str(exc)
    if st is None:
        return None
    return _lock_problem(path, st) if what == "lock" else _file_problem(path, st, what)


def _lock_problem(path: str, st: os.stat_result) -> str | None:
    if stat.S_ISLNK(st.st_mode):
        return f"cannot open lock {path}: it is a symlink; refusing to follow it"
    if not stat.S_ISREG(st.st_mode):
        return f"cannot open lock {path}: it is not a regular file"
    return None


def _temporary(path: str) -> tuple[str, int]:
    """A new file beside ``path``, created exclusively under a random name: (name, fd).

    O_EXCL with O_NOFOLLOW: a file or symlink another user planted under the
    name is never opened, and the name cannot be guessed in advance.
    """
    directory, base = os.path.dirname(path) or ".", os.path.basename(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _attempt in range(100):
        name = os.path.join(directory, f".{base}.tmp-{secrets.token_hex(8)}")
        try:
            return name, os.open(name, flags, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            raise BundleError(
                f"cannot create a temporary file in {directory}: {_describe(exc)}"
            ) from None
    raise BundleError(f"cannot create a temporary file in {directory}: every name was taken")


def write_atomic(
    path: str,
    content: bytes,
    mode: int,
    uid: int = -1,
    gid: int = -1,
    setting: tuple[str, str] | None = None,
    what: str = "target",
) -> None:
    """Replace ``path`` with ``content``: the old or the new bytes, never a mix.

    ``uid``/``gid`` of -1 keep the replaced file's owner/group (a rewrite must not
    turn a kube-owned 0640 bundle into root's, which a non-root apiserver could
    no longer read); a new file gets this process's. ``setting`` is the state
    field and value the directory comes from, named when it is unsafe.
    """
    _require(_directory_problem(*(setting or ("bundle.path", path))))
    st = _lstat(path, what)
    if st is not None:
        _check_regular(path, st, what)
        uid = st.st_uid if uid == -1 else uid
        gid = st.st_gid if gid == -1 else gid
    directory = os.path.dirname(path) or "."
    tmp, fd = _temporary(path)
    try:
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
            if uid != -1 or gid != -1:
                os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as exc:
        with suppress(OSError):
            os.unlink(tmp)
        raise BundleError(f"cannot write {path}: {_describe(exc)}; it is unchanged") from None
    _fsync_dir(directory, f"wrote {path}")


def _fsync_dir(directory: str, done: str) -> None:
    """Make a rename or unlink in ``directory`` durable; ``done`` says what happened."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise BundleError(
            f"{done}, but cannot sync its directory {directory}: {_describe(exc)}; "
            "the change may not survive a crash"
        ) from None


def write(config: BundleConfig, content: bytes, path: str | None = None) -> None:
    """Write the bundle (or, with ``path``, the JWKS file) with the bundle's mode/owner."""
    uid, gid = _ids(config)
    if path is None or path == config.path:
        origin, what = ("bundle.path", config.path), "bundle"
    else:
        origin, what = ("bundle.jwks_path", path), "JWKS file"
    write_atomic(origin[1], content, config.mode, uid, gid, origin, what)


def fix_permissions(config: BundleConfig) -> None:
    uid, gid = _ids(config)
    try:
        fd = os.open(config.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if uid != -1 or gid != -1:
                os.fchown(fd, uid, gid)
            os.fchmod(fd, config.mode)
        finally:
            os.close(fd)
    except OSError as exc:
        raise BundleError(f"cannot set permissions of {config.path}: {_describe(exc)}") from None


# The marker's first word when nobody was to run the owed reload (no bundle.reload, no
# caller): then it is a warning on every run, not an action.
UNOWNED = b"unowned:"


def mark_reload_pending(config: BundleConfig, reason: str) -> None:
    """Durably remember that a reload is owed, before the write that makes it owed.
    ``reason`` starting with ``unowned:`` says that nobody was to run it."""
    marker = config.path + PENDING_SUFFIX
    origin = ("bundle.path", config.path)
    write_atomic(marker, f"{reason}\n".encode(), 0o600, setting=origin, what="reload marker")


def clear_reload_pending(config: BundleConfig) -> None:
    marker = config.path + PENDING_SUFFIX
    try:
        os.unlink(marker)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise BundleError(f"cannot remove {marker}: {_describe(exc)}") from None
    _fsync_dir(os.path.dirname(marker) or ".", f"removed {marker}")


def _holder(fd: int) -> str:
    """The PID the lock's holder wrote, or "unknown"."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def _remove_stale_temporaries(config: BundleConfig) -> None:
    """Temp files a killed run left behind: regular files of ours only, never another's."""
    targets = [config.path, config.path + PENDING_SUFFIX]
    if config.jwks_path:
        targets.append(config.jwks_path)
    for target in targets:
        directory, name = os.path.dirname(target) or ".", os.path.basename(target)
        for stale in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.tmp-*")):
            with contextlib.suppress(OSError):
                st = os.lstat(stale)
                if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                    os.unlink(stale)


@contextmanager
def locked(config: BundleConfig, timeout: float) -> Iterator[None]:
    """Hold ``<bundle>.lock`` exclusively; wait up to ``timeout`` seconds for it.

    The holder writes its PID into the lock file, so a run that gives up can say
    which process holds it.
    """
    _require(_directory_problem("bundle.path", config.path))
    lock_path = config.path + LOCK_SUFFIX
    st = _lstat(lock_path, "lock")
    if st is not None:
        _require(_lock_problem(lock_path, st))
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise BundleError(f"cannot open lock {lock_path}: {_describe(exc)}") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BundleError(
                        f"another sakeystate run (PID {_holder(fd)}) holds the lock "
                        f"{lock_path}; gave up after {timeout:g}s"
                    ) from None
                time.sleep(0.05)
        with suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _remove_stale_temporaries(config)
        yield
    finally:
        os.close(fd)
