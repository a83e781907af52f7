"""The binaries the suite runs, from e2e/build.py's cache (built when missing).

A missing toolchain or a failed build skips what needs it, and fails it under
``CI=true``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

E2E = Path(__file__).resolve().parent
IN_CI = os.environ.get("CI", "").lower() == "true"
DEFAULT_KUBE = "v1.37.2,v1.34.4"

# e2e/build.py under a name of its own: "build" is also PyPI's build package.
_spec = importlib.util.spec_from_file_location("sakeystate_e2e_build", E2E / "build.py")
assert _spec is not None and _spec.loader is not None
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


def kube_versions() -> list[str]:
    """``SAKEYSTATE_E2E_KUBE``: the releases to run, the scenarios' first."""
    text = os.environ.get("SAKEYSTATE_E2E_KUBE", DEFAULT_KUBE)
    return [v.strip() for v in text.split(",") if v.strip()]


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def binary(component: str, version: str) -> Path:
    try:
        return Path(build.ensure(component, version))
    except FileNotFoundError as exc:
        unavailable(f"cannot build {component} {version}: {exc} (is Go installed?)")
    except (SystemExit, subprocess.CalledProcessError) as exc:
        unavailable(f"cannot build {component} {version}: {exc}")
    raise AssertionError("unreachable")
