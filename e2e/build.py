"""Build the real components the end-to-end suite runs, into a cache outside the repository.

    python e2e/build.py kube-apiserver v1.37.2
    python e2e/build.py etcd v3.6.16

kube-apiserver is built from the Kubernetes Go module ``k8s.io/kubernetes`` at a pinned
release. That module replaces its staging modules (``k8s.io/api``, ``k8s.io/apiserver``,
...) with local paths, so it cannot be required as it is: a small wrapper module requires
it and replaces each staging module with the same release's published version
(``v1.37.2`` -> ``v0.37.2``). etcd 3.6 is built the same way from ``go.etcd.io/etcd``.

The cache is keyed by component, version and Go version
(``$SAKEYSTATE_E2E_CACHE``, default ``~/.cache/sakeystate-e2e``); a binary already there
is reused. Prints the binary's path on stdout, and on stderr the build time (or, when
cached, what its cold build took).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cache_root() -> Path:
    explicit = os.environ.get("SAKEYSTATE_E2E_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sakeystate-e2e"


def go_version() -> str:
    out = subprocess.run(["go", "env", "GOVERSION"], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def _go(args: list[str], cwd: Path) -> None:
    env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-mod=mod -buildvcs=false")
    proc = subprocess.run(["go", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
        raise SystemExit(f"e2e/build.py: `go {' '.join(args)}` failed in {cwd}:\n{tail}")


def _module_gomod(path: str, version: str, cwd: Path) -> str:
    env = dict(os.environ, GOFLAGS="-mod=mod")
    proc = subprocess.run(
        ["go", "mod", "download", "-json", f"{path}@{version}"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"e2e/build.py: cannot download {path}@{version}:\n{proc.stderr}")
    return Path(json.loads(proc.stdout)["GoMod"]).read_text()


def _staging_replaces(gomod: str, staging_version: str) -> list[str]:
    """Each `k8s.io/x => ./staging/...` replace, pointed at the published release."""
    names = re.findall(r"^\s*(k8s\.io/[\w.-]+)\s*=>\s*\./staging/", gomod, re.MULTILINE)
    return [f"\t{name} => {name} {staging_version}" for name in sorted(set(names))]


def build_kube_apiserver(version: str, out: Path, work: Path) -> None:
    _major, minor, patch = version.lstrip("v").split(".")
    staging = f"v0.{minor}.{patch}"
    (work / "go.mod").write_text("module sakeystate.invalid/e2e-kube\n\ngo 1.26.0\n")
    gomod = _module_gomod("k8s.io/kubernetes", version, work)
    go_line = re.search(r"^go (\S+)", gomod, re.MULTILINE)
    replaces = _staging_replaces(gomod, staging)
    (work / "go.mod").write_text(
        "module sakeystate.invalid/e2e-kube\n\n"
        f"go {go_line.group(1) if go_line else '1.26.0'}\n\n"
        f"require k8s.io/kubernetes {version}\n\n"
        "replace (\n" + "\n".join(replaces) + "\n)\n"
    )
    (work / "tools.go").write_text(
        '//go:build tools\n\npackage tools\n\nimport _ "k8s.io/kubernetes/cmd/kube-apiserver"\n'
    )
    _go(["mod", "tidy"], work)
    _go(["build", "-trimpath", "-o", str(out), "k8s.io/kubernetes/cmd/kube-apiserver"], work)


def build_etcd(version: str, out: Path, work: Path) -> None:
    (work / "go.mod").write_text("module sakeystate.invalid/e2e-etcd\n\ngo 1.26.0\n")
    (work / "tools.go").write_text(
        '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3/etcdmain"\n'
    )
    (work / "main.go").write_text(
        'package main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\n'
        "func main() { etcdmain.Main(os.Args) }\n"
    )
    _go(["get", f"go.etcd.io/etcd/server/v3@{version}"], work)
    _go(["mod", "tidy"], work)
    _go(["build", "-trimpath", "-o", str(out), "."], work)


BUILDERS = {"kube-apiserver": build_kube_apiserver, "etcd": build_etcd}


def ensure(component: str, version: str) -> Path:
    """The cached binary, built first when missing.

    One build per cache entry at a time (a lock beside it: a second caller waits and
    then reuses the first one's binary). The build's time is kept beside the binary
    (``build.json``), so that a warm run can still report what the cold build cost.
    """
    target = cache_root() / f"{component}-{version}-{go_version()}" / component
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="build-", dir=target.parent) as tmp:
            partial = Path(tmp) / component
            BUILDERS[component](version, partial, Path(tmp))
            os.replace(partial, target)
        seconds = time.monotonic() - started
        record = {
            "component": component,
            "version": version,
            "go": go_version(),
            "seconds": round(seconds, 1),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "nproc": os.cpu_count(),
        }
        (target.parent / "build.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"e2e/build.py: built {component} {version} in {seconds:.0f} s", file=sys.stderr)
    return target


def build_record(target: Path) -> dict[str, object] | None:
    """What the cold build of a cached binary cost (None when it was not recorded)."""
    try:
        return dict(json.loads((target.parent / "build.json").read_text()))
    except (OSError, ValueError):
        return None


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in BUILDERS:
        print(f"usage: {argv[0]} {{{'|'.join(BUILDERS)}}} VERSION", file=sys.stderr)
        return 1
    if shutil.which("go") is None:
        print(f"e2e/build.py: no go toolchain on PATH: cannot build {argv[1]}", file=sys.stderr)
        return 1
    cached = (cache_root() / f"{argv[1]}-{argv[2]}-{go_version()}" / argv[1]).exists()
    target = ensure(argv[1], argv[2])
    if cached:
        record = build_record(target)
        cold = (
            f"its cold build took {record['seconds']} s on {record['built']}"
            if record
            else ("its cold build time was not recorded")
        )
        print(f"e2e/build.py: {argv[1]} {argv[2]} cached ({cold})", file=sys.stderr)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
