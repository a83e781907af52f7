"""One exception hierarchy; the CLI maps it to exit codes in one place."""

from __future__ import annotations


class SakeystateError(Exception):
    """An expected failure: printed to stderr as one clear message, exit 1."""


class StateError(SakeystateError):
    """The desired-state file is unreadable or invalid."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(problems))


class KeyRejected(SakeystateError):
    """A key or certificate that kube-apiserver must never be given."""


class EtcdError(SakeystateError):
    """etcd is unreachable, timed out, refused us, or changed under us."""


class PermissionDenied(EtcdError):
    """etcd's RBAC refused the call (a grant is missing)."""


class BundleError(SakeystateError):
    """The bundle file (or its lock / marker) cannot be read or written safely."""


class ReloadFailed(SakeystateError):
    """The reload command failed or timed out; the next run retries it."""
