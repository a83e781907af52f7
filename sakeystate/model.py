"""Plain values passed between the readers (etcd, bundle), the planner and the appliers.

No behaviour lives here: these are the facts observed and the writes planned.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EtcdEntry:
    """One key under the prefix, as read, with the revision every write is guarded on."""

    key: str
    value: bytes
    mod_revision: int
    create_revision: int = 0


@dataclass(frozen=True)
class EtcdObservation:
    prefix: str
    revision: int
    entries: tuple[EtcdEntry, ...]


@dataclass(frozen=True)
class BundleObservation:
    """The bundle file as found, and whether an earlier reload is still owed."""

    path: str
    content: bytes | None  # None: the file does not exist
    mode: int | None = None
    owner: str | None = None
    group: str | None = None
    reload_pending: bool = False
    jwks_content: bytes | None = None  # the JWKS file, when bundle.jwks_path is set
    # The owed reload was left to nobody (no bundle.reload, no caller): only a warning
    # until someone restarts kube-apiserver and says so with `reload-done`.
    reload_unowned: bool = False


@dataclass(frozen=True)
class Guard:
    """An etcd compare: ``key`` must still be at ``mod_revision`` (0: must not exist)."""

    key: str
    mod_revision: int


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes


@dataclass(frozen=True)
class Delete:
    key: str


EtcdOp = Put | Delete
