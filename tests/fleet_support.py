"""A fleet of control planes sharing one anchor-based state file, for multi-host tests.

On a real fleet the state file is byte-identical on every host; here each host's copy
differs only in where its bundle and own certificate live, since the "hosts" share one
machine. Each plane runs the CLI in-process with ``--host`` set to its FQDN.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jwt_support import verifies_with_bundle

from sakeystate.keys import format_time, parse_pem_bundle

from conftest import Env
from pki import Leaf, Pki, host
from support import T0, run_cli, state_data, write_state

AT = format_time(T0)
HOSTS = [host(1001), host(1002), host(1003)]


@dataclass
class Plane:
    """One control plane: its directory, state file, own certificate and reload log."""

    name: str
    root: Path
    state: Path
    leaf: Leaf

    @property
    def bundle(self) -> Path:
        return self.root / "sa-certs.pem"

    @property
    def own_cert(self) -> Path:
        return self.root / "sa.pem"

    @property
    def reloads(self) -> int:
        log = self.root / "reloads.log"
        return len(log.read_text().splitlines()) if log.exists() else 0


class Fleet:
    def __init__(
        self,
        env: Env,
        pki: Pki,
        common_name: str | None,
        shape: str,
        hosts: list[str] | None = None,
        **overrides: Any,
    ) -> None:
        self.env, self.pki, self.shape = env, pki, shape
        self.hosts = hosts or HOSTS
        ca = env.tmp / "cluster-ca.pem"
        ca.write_bytes(pki.ca_file())
        anchor: dict[str, Any] = {"name": "wikikube-pki", "ca_file": str(ca), "hosts": self.hosts}
        if common_name:
            anchor["common_name"] = common_name
        self.planes = []
        for fqdn in self.hosts:
            root = env.tmp / fqdn
            root.mkdir()
            leaf = self.new_leaf(fqdn)
            settings: dict[str, Any] = {
                "host": "self",
                "own_cert": str(root / "sa.pem"),
                "trust_anchors": [anchor],
                "etcd": {"status_prefix": env.prefix.replace("certs", "status")},
                "bundle": {
                    "exclude_host": "self",
                    "reload": ["sh", "-c", f"echo reload >> {root / 'reloads.log'}"],
                },
            }
            for section, value in overrides.items():
                if isinstance(value, dict) and isinstance(settings.get(section), dict):
                    settings[section] = {**settings[section], **value}
                elif value is None:
                    settings.pop(section, None)
                else:
                    settings[section] = value
            data = state_data(env.etcd.url, env.prefix, root / "sa-certs.pem", [], **settings)
            plane = Plane(fqdn, root, write_state(root / "state.yaml", data), leaf)
            plane.own_cert.write_bytes(leaf.chained)
            self.planes.append(plane)
        self.converges = 0

    def new_leaf(self, fqdn: str, key: Any = None) -> Leaf:
        if self.shape == "sa":
            return self.pki.sa(key=key)
        return self.pki.sa_named(fqdn, key=key)

    def cli(self, plane: Plane, command: str, *args: str) -> Any:
        return run_cli(command, "--state", str(plane.state), "--host", plane.name, *args)

    def publish(self, plane: Plane, at: str = AT) -> None:
        result = self.cli(plane, "publish", "--cert", str(plane.own_cert), "--at", at)
        assert result.code == 0, result.err

    def converge(self, plane: Plane, at: str = AT) -> dict[str, Any]:
        self.converges += 1
        result = self.cli(plane, "converge", "--at", at, "--format", "json")
        assert result.code == 0, result.err
        report: dict[str, Any] = json.loads(result.out)
        return report

    def verifies(self, plane: Plane, token: str) -> bool:
        """What this plane's apiserver verifies: the bundle plus its own key's flag."""
        return verifies_with_bundle(token, plane.bundle.read_bytes()) or verifies_with_bundle(
            token, plane.own_cert.read_bytes()
        )

    def plane(self, name: str) -> Plane:
        return next(p for p in self.planes if p.name == name)

    def edit_state(self, **changes: Any) -> None:
        """One reviewed edit of the shared state file, copied to every host."""
        import yaml

        for plane in self.planes:
            data = yaml.safe_load(plane.state.read_text())
            for section, value in changes.items():
                if value is None:
                    data.pop(section, None)
                else:
                    data[section] = value
            write_state(plane.state, data)

    def bundle_kids(self, plane: Plane) -> set[str]:
        """What kube-apiserver loads from this plane's bundle."""
        if not plane.bundle.exists():
            return set()
        return {k.kid for k in parse_pem_bundle(plane.bundle.read_bytes())[0]}

    def verified(self, plane: Plane) -> set[str]:
        """What this plane's apiserver verifies: its bundle and its own key."""
        return self.bundle_kids(plane) | {plane.leaf.kid}

    def key(self, plane: Plane, kid: str | None = None) -> str:
        """The etcd key of a plane's (current) key in the per-host layout."""
        return f"{self.env.prefix}{plane.name}/{kid or plane.leaf.kid}"

    def reimage(self, plane: Plane, at: str = AT) -> Leaf:
        """A new key in own_cert, published (at ``at``); returns the old leaf."""
        old = plane.leaf
        plane.leaf = self.new_leaf(plane.name)
        plane.own_cert.write_bytes(plane.leaf.chained)
        self.publish(plane, at)
        return old
