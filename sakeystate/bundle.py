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
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import grp
import os
import pwd
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


def _check_parent(path: str) -> None:
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise BundleError(f"bundle directory {parent} does not exist (bundle.path {path})")


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BundleError(f"cannot stat bundle {path}: {_describe(exc)}") from None


def _check_regular(path: str, st: os.stat_result, what: str = "bundle") -> None:
    if stat.S_ISLNK(st.st_mode):
        raise BundleError(f"{what} {path} is a symlink; refusing to follow it")
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{what} {path} is not a regular file")


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
    pending = _lstat(path + PENDING_SUFFIX) is not None
    jwks = _read(config.jwks_path, "JWKS file")[0] if config.jwks_path else None
    if st is None:
        return BundleObservation(path, None, reload_pending=pending, jwks_content=jwks)
    return BundleObservation(
        path=path,
        content=content,
        mode=stat.S_IMODE(st.st_mode),
        owner=_user_name(st.st_uid),
        group=_group_name(st.st_gid),
        reload_pending=pending,
        jwks_content=jwks,
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


def _ids(config: BundleConfig) -> tuple[int, int]:
    uid = gid = -1
    if config.owner:
        try:
            uid = pwd.getpwnam(config.owner).pw_uid
        except KeyError:
            raise BundleError(f"bundle.owner {config.owner!r} is not a user on this host") from None
    if config.group:
        try:
            gid = grp.getgrnam(config.group).gr_gid
        except KeyError:
            raise BundleError(
                f"bundle.group {config.group!r} is not a group on this host"
            ) from None
    return uid, gid


def write_atomic(path: str, content: bytes, mode: int, uid: int = -1, gid: int = -1) -> None:
    """Replace ``path`` with ``content``: the old or the new bytes, never a mix."""
    _check_parent(path)
    st = _lstat(path)
    if st is not None:
        _check_regular(path, st, "target")
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except OSError as exc:
        raise BundleError(
            f"cannot create a temporary file in {directory}: {_describe(exc)}"
        ) from None
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
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(config: BundleConfig, content: bytes, path: str | None = None) -> None:
    """Write the bundle (or, with ``path``, a file beside it) with the bundle's mode/owner."""
    uid, gid = _ids(config)
    write_atomic(path or config.path, content, config.mode, uid, gid)


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


def mark_reload_pending(config: BundleConfig, reason: str) -> None:
    """Durably remember that a reload is owed, before the write that makes it owed."""
    write_atomic(config.path + PENDING_SUFFIX, f"{reason}\n".encode(), 0o600)


def clear_reload_pending(config: BundleConfig) -> None:
    marker = config.path + PENDING_SUFFIX
    try:
        os.unlink(marker)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise BundleError(f"cannot remove {marker}: {_describe(exc)}") from None
    _fsync_dir(os.path.dirname(marker) or ".")


def _remove_stale_temporaries(config: BundleConfig) -> None:
    """Temp files a killed run left behind; only the lock holder may write them."""
    targets = [config.path, config.path + PENDING_SUFFIX]
    if config.jwks_path:
        targets.append(config.jwks_path)
    for target in targets:
        directory, name = os.path.dirname(target) or ".", os.path.basename(target)
        for stale in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.tmp-*")):
            with contextlib.suppress(OSError):
                os.unlink(stale)


@contextmanager
def locked(config: BundleConfig, timeout: float) -> Iterator[None]:
    """Hold ``<bundle>.lock`` exclusively; wait up to ``timeout`` seconds for it."""
    _check_parent(config.path)
    lock_path = config.path + LOCK_SUFFIX
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
                        f"another sakeystate run holds the lock {lock_path}; "
                        f"gave up after {timeout:g}s"
                    ) from None
                time.sleep(0.05)
        _remove_stale_temporaries(config)
        yield
    finally:
        os.close(fd)
