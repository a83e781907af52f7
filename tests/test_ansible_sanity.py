"""The collection as Ansible's own tools see it: ansible-test sanity, ansible-lint, a build.

ansible-test sanity runs offline but for PyPI: each sanity test's pinned requirements
are installed from PyPI into ansible-test's virtualenvs, which live beside this
interpreter (``<venv>/ansible-test-home``, built once per project venv). ansible-test
seeds those virtualenvs with a get-pip script from ci-files.testing.ansible.com; a
stand-in (``GET_PIP_STANDIN``) seeds pip from the interpreter's own ensurepip instead.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import yaml

from sakeystate import __version__

from ansible_support import BIN, COLLECTION, ansible_environ, ansible_tool
from support import REPO

TEST_HOME = Path(sys.prefix) / "ansible-test-home"
GET_PIP_STANDIN = '''\
"""Offline stand-in for ansible-test's get-pip bootstrap script (written by the tests).

Seeds pip from this interpreter's bundled ensurepip wheel, then lets that pip install
the pinned packages ansible-test asked for from the configured index (PyPI).
"""

import subprocess
import sys

GET_PIP_ONLY = {"--no-setuptools", "--no-wheel"}

subprocess.run([sys.executable, "-m", "ensurepip", "--default-pip"], check=True,
               stdout=subprocess.DEVNULL)
args = [arg for arg in sys.argv[1:] if arg not in GET_PIP_ONLY]
sys.exit(subprocess.run([sys.executable, "-m", "pip", "install", *args]).returncode)
'''
# The tests the issue found failing, which must run (and pass) among all the others.
MUST_RUN = {"validate-modules", "no-assert", "import", "compile"}


def pip_version() -> str:
    """The pip ansible-test bootstraps (it names its cached get-pip script after it)."""
    import ansible_test

    source = Path(ansible_test.__file__).parent / "_internal" / "python_requirements.py"
    found = re.search(r"pip='([0-9.]+)'", source.read_text())
    assert found, f"no pip version in {source}"
    return found.group(1)


def collection_copy(tmp: Path) -> Path:
    """The collection in an ansible_collections tree of its own (ansible-test writes into it)."""
    target = tmp / "ansible_collections" / "sakeystate" / "sakeystate"
    shutil.copytree(COLLECTION, target, ignore=shutil.ignore_patterns("output", "__pycache__"))
    return target


def test_ansible_test_sanity_passes_offline(tmp_path: Path) -> None:
    cache = TEST_HOME / ".ansible" / "test" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / f"get_pip_{pip_version().replace('.', '_')}.py").write_text(GET_PIP_STANDIN)
    root = collection_copy(tmp_path)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"

    def sanity(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "ansible-test"), "sanity", "--local", "--python", python, *args],
            cwd=root,
            env={**ansible_environ(tmp_path), "HOME": str(TEST_HOME)},
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )

    # Every sanity test this ansible-core offers a collection (24 with 2.19) runs.
    offered = {line for line in sanity("--list-tests").stdout.split() if line}
    proc = sanity("--color", "no")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    ran = set(re.findall(r'Running sanity test "([\w-]+)"', output))
    assert ran == offered, sorted(offered ^ ran)
    assert ran >= MUST_RUN
    assert "ERROR" not in output


def test_galaxy_build_ships_the_modules_and_metadata(tmp_path: Path) -> None:
    galaxy = yaml.safe_load((COLLECTION / "galaxy.yml").read_text())
    assert galaxy["version"] == __version__  # released together with the package
    assert galaxy["license"] == ["Apache-2.0"]
    runtime = yaml.safe_load((COLLECTION / "meta" / "runtime.yml").read_text())
    assert runtime["requires_ansible"].startswith(">=")

    built = ansible_tool(
        tmp_path,
        "ansible-galaxy",
        "collection",
        "build",
        str(collection_copy(tmp_path / "src")),
        "--output-path",
        str(tmp_path),
    )
    assert built.returncode == 0, built.stdout + built.stderr
    tarball = tmp_path / f"sakeystate-sakeystate-{__version__}.tar.gz"
    with tarfile.open(tarball) as archive:
        names = set(archive.getnames())
    modules = ("converge", "publish", "reload", "reload_done", "status", "wait", "plan_info")
    assert {
        "MANIFEST.json",
        "meta/runtime.yml",
        *(f"plugins/modules/{m}.py" for m in modules),
        *(f"plugins/action/{m}.py" for m in modules),
        "plugins/module_utils/cli.py",
        "plugins/plugin_utils/inventory_host.py",
        "plugins/doc_fragments/common.py",
        "roles/watch/tasks/main.yml",
        "roles/watch/files/sakeystate-watch.service",
        "roles/watch/meta/argument_specs.yml",
        "roles/boot/tasks/main.yml",
        "roles/boot/files/sakeystate-boot.service",
        "roles/boot/files/sakeystate-boot-done.service",
        "roles/boot/vars/main.yml",
        "changelogs/config.yaml",
        "CHANGELOG.md",
        "README.md",
        "LICENSE",
    } <= names

    installed = ansible_tool(
        tmp_path,
        "ansible-galaxy",
        "collection",
        "install",
        "--force",
        str(tarball),
        "-p",
        str(tmp_path),
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    doc = subprocess.run(
        [str(BIN / "ansible-doc"), "sakeystate.sakeystate.converge"],
        env={**ansible_environ(tmp_path), "ANSIBLE_COLLECTIONS_PATH": str(tmp_path)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert doc.returncode == 0, doc.stderr
    assert str(tmp_path / "ansible_collections") in doc.stdout, doc.stderr  # the installed copy


def ansible_lint(tmp: Path, playbook: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "ansible-lint"), "--offline", "--nocolor", str(playbook)],
        cwd=playbook.parent,
        env={**ansible_environ(tmp), "HOME": str(tmp)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_ansible_lint_passes_the_example_playbook(tmp_path: Path) -> None:
    proc = ansible_lint(tmp_path, REPO / "ansible" / "playbook.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 failure(s), 0 warning(s)" in proc.stdout + proc.stderr


def test_ansible_lint_passes_the_collection(tmp_path: Path) -> None:
    root = collection_copy(tmp_path)
    proc = subprocess.run(
        [str(BIN / "ansible-lint"), "--offline", "--nocolor"],
        cwd=root,
        env={**ansible_environ(tmp_path), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Profile 'production' was required, and it passed" in proc.stdout + proc.stderr


def test_galaxy_metadata_claims_no_url_the_project_does_not_have() -> None:
    # The project has no public repository, documentation site or issue tracker yet:
    # galaxy.yml (and the Puppet metadata) leave those fields out rather than invent one.
    galaxy = yaml.safe_load((COLLECTION / "galaxy.yml").read_text())
    assert not {"repository", "documentation", "homepage", "issues"} & set(galaxy)
    lint = yaml.safe_load((COLLECTION / ".ansible-lint").read_text())
    assert lint["skip_list"] == ["galaxy[no-repository]"]


def test_ansible_lint_rejects_a_playbook_without_fqcn(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    plays = yaml.safe_load((REPO / "ansible" / "playbook.yml").read_text())
    plays[0]["tasks"][0]["template"] = plays[0]["tasks"][0].pop("ansible.builtin.template")
    bad.write_text(yaml.safe_dump(plays, sort_keys=False))
    proc = ansible_lint(tmp_path, bad)
    assert proc.returncode != 0
    assert "fqcn" in proc.stdout + proc.stderr


def test_example_state_template_renders_a_valid_shared_state(tmp_path: Path) -> None:
    import jinja2

    template = REPO / "ansible" / "templates" / "sakeystate-state.yaml.j2"
    rendered = jinja2.Template(template.read_text(), undefined=jinja2.StrictUndefined).render()
    state = yaml.safe_load(rendered)
    assert state["host"] == "self" and state["bundle"]["exclude_host"] == "self"
    path = tmp_path / "state.yaml"
    path.write_text(rendered)
    proc = subprocess.run(
        [str(BIN / "sakeystate"), "validate", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
