"""Packaging as a packager sees it: the built wheel installed outside the checkout, the
licence, the single version, and the generated man page and completions being current."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

from sakeystate import __version__

from support import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def cli_docs() -> ModuleType:
    """tools/cli_docs.py, the generator `make docs-gen` runs."""
    spec = importlib.util.spec_from_file_location("cli_docs", REPO / "tools" / "cli_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*argv: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_man_page_and_completions_are_current() -> None:
    proc = run(sys.executable, REPO / "tools" / "cli_docs.py", "--check", cwd=REPO)
    assert proc.returncode == 0, f"{proc.stderr} (run `make docs-gen` after changing the CLI)"


def test_man_page_and_completions_come_from_the_parser() -> None:
    from sakeystate.cli import build_parser

    docs = cli_docs()
    generated = docs.generate()
    subparsers = next(
        a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction"
    )
    commands = list(subparsers.choices)  # type: ignore[union-attr]
    assert "converge" in commands and "publish" in commands
    for command in commands:
        roff = command.replace("-", "\\-")
        assert f".SH COMMAND \\fI\\,'sakeystate {roff}'\\/\\fR" in generated[docs.MAN]
        assert command in generated[docs.BASH]
        assert command in generated[docs.ZSH]
    assert generated[docs.MAN].startswith('.TH SAKEYSTATE "1"')
    assert f"sakeystate {__version__}" in generated[docs.MAN].splitlines()[0]


def test_licence_file_matches_the_declared_licence() -> None:
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text


def test_version_lives_in_one_place() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["hatch"]["version"]["path"] == "sakeystate/__init__.py"
    assert f"## [{__version__}] - " in (REPO / "CHANGELOG.md").read_text()


def test_package_is_typed_and_ships_no_test_helper() -> None:
    assert (REPO / "sakeystate" / "py.typed").exists()
    assert not (REPO / "sakeystate" / "testing.py").exists()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = run(sys.executable, "-m", "build", "--wheel", "--outdir", out, REPO, cwd=out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = out.glob("sakeystate-*.whl")
    return built


def test_wheel_holds_the_package_its_data_and_nothing_else(wheel: Path) -> None:
    assert wheel.name == f"sakeystate-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"sakeystate-{__version__}.dist-info/METADATA").decode()
    assert "sakeystate/py.typed" in names
    assert "sakeystate/_schema/sakeystate-v1.schema.json" in names
    assert f"sakeystate-{__version__}.dist-info/licenses/LICENSE" in names
    data = f"sakeystate-{__version__}.data/data/share"
    assert f"{data}/man/man1/sakeystate.1" in names
    assert f"{data}/bash-completion/completions/sakeystate" in names
    assert f"{data}/zsh/site-functions/_sakeystate" in names
    assert not any(n.startswith(("tests/", "sakeystate/testing")) for n in names)
    assert "License-Expression: Apache-2.0" in metadata
    assert "Classifier: Typing :: Typed" in metadata


def test_wheel_installed_outside_the_checkout_runs(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    assert run(base, "-m", "venv", venv, cwd=tmp_path).returncode == 0
    pip = [venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check"]
    installed = run(*pip, "install", "--quiet", wheel, cwd=tmp_path, timeout=900)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    exe = venv / "bin" / "sakeystate"

    where = run(venv / "bin" / "python", "-c", "import sakeystate; print(sakeystate.__file__)",
                cwd=tmp_path)  # fmt: skip
    assert where.stdout.startswith(str(venv)), where.stdout  # the installed copy, not the checkout
    version = run(exe, "--version", cwd=tmp_path)
    assert (version.returncode, version.stdout.strip()) == (0, f"sakeystate {__version__}")
    valid = run(exe, "validate", REPO / "state" / "minimal.yaml", cwd=tmp_path)
    assert valid.returncode == 0, valid.stdout + valid.stderr
    helped = run(exe, "plan", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "--detailed-exitcode" in helped.stdout
    checked = run(*pip, "check", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert (venv / "share" / "man" / "man1" / "sakeystate.1").exists()
