"""The sakeystate demo: three control planes, a reimage, and a token that keeps working.

Starts a throwaway local etcd, creates three control planes' keys, publishes
them, converges every control plane; then reimages one (new key), shows the
plan (old key kept, new key waiting for review), trusts the new kid, converges
again, and verifies that a token signed with the OLD key still validates
against the bundle. Every control plane runs with the cluster's one reviewed
state file (``host: self``, ``exclude_host: self``) and its own ``--host``.
Everything runs through the real `sakeystate` command.
Its etcd and temporary files are removed on exit, also on Ctrl-C.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sakeystate.keys import kid_of, parse_pem_bundle

# The throwaway etcd is a test helper (tests/etcd_server.py), not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from etcd_server import EtcdServer

HOSTS = ("ctrl1001.eqiad.example.org", "ctrl1002.eqiad.example.org", "ctrl1003.eqiad.example.org")
SAKEYSTATE = str(Path(sys.executable).parent / "sakeystate")
ISSUER = "https://kubernetes.default.svc.cluster.local"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


DEMO_ROOT: list[str] = []


def run(*args: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    shown = " ".join(["sakeystate", *args])
    for root in DEMO_ROOT:
        shown = shown.replace(root, "$DEMO")
    print(f"$ {shown}", flush=True)
    proc = subprocess.run([SAKEYSTATE, *args], capture_output=True, text=True, check=False)
    sys.stdout.write(proc.stdout)
    sys.stdout.write("".join(f"  stderr: {line}\n" for line in proc.stderr.splitlines()))
    if proc.returncode not in ok:
        raise SystemExit(f"demo failed: sakeystate {args[0]} exited {proc.returncode}")
    return proc


class ControlPlane:
    """One control plane's files: its signing key, certificate, bundle and state file."""

    def __init__(self, root: Path, host: str) -> None:
        self.host = host
        self.dir = root / host.split(".")[0]
        self.dir.mkdir()
        self.bundle = self.dir / "kube-apiserver-sa-certs.pem"
        self.state = self.dir / "state.yaml"
        self.restarts = self.dir / "restarts.log"  # written by the state's reload command
        self.key: Any = None
        self.reimage()

    def reimage(self) -> None:
        """A fresh install: a new ECDSA P-521 key and certificate, as the PKI issues them."""
        self.key = ec.generate_private_key(ec.SECP521R1())
        now = datetime.now(UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.host)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=365))
            .sign(self.key, hashes.SHA512())
        )
        (self.dir / "sa.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    @property
    def kid(self) -> str:
        return kid_of(self.key.public_key())

    def args(self) -> list[str]:
        """The arguments every command takes on this control plane."""
        return ["--state", str(self.state), "--host", self.host]

    def sign_token(self, subject: str) -> str:
        """A service-account token as kube-apiserver signs it (ES512, kid header)."""
        now = datetime.now(UTC)
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": ["https://kubernetes.default.svc"],
            "iat": now,
            "nbf": now,
            "exp": now + timedelta(days=365),
        }
        return jwt.encode(claims, self.key, algorithm="ES512", headers={"kid": self.kid})

    def deploy(self, etcd_url: str, trusted: list[tuple[str, str]]) -> None:
        """Install the cluster's one reviewed state file on this control plane."""
        self.state.write_text(reviewed_state(etcd_url, trusted, self.dir))


def reviewed_state(etcd_url: str, trusted: list[tuple[str, str]], root: Path) -> str:
    """The cluster's state file: one document for every control plane.

    Nothing in it names a host: ``host: self`` is the ``--host`` each command is given
    (on a real host, the machine's FQDN), ``exclude_host: self`` leaves out exactly this
    host's own_cert key. On a real cluster the file is deployed unchanged; here the
    three control planes share one disk, so ``root`` puts each one's files (bundle,
    own certificate, restart log) in its own directory.
    """
    reload = [
        sys.executable,
        "-c",
        f"open({str(root / 'restarts.log')!r}, 'a').write('restart\\n'); "
        "print('kube-apiserver restarted')",
    ]
    document = {
        "apiVersion": "sakeystate/v1",
        "cluster": "demo",
        "host": "self",
        "own_cert": str(root / "sa.pem"),
        "etcd": {
            "endpoints": [etcd_url],
            "prefix": "/kube-apiserver-sa-certs/",
            "timeout": "5s",
        },
        "bundle": {
            "path": str(root / "kube-apiserver-sa-certs.pem"),
            "mode": "0644",
            "exclude_host": "self",
            "reload": reload,
        },
        "trusted": [{"fingerprint": kid, "host": host} for kid, host in trusted],
        "retention": {
            "max_token_lifetime": "8760h",
            "superseded_grace": "8760h",
            "min_keys": 1,
            "max_removals": 1,
        },
    }
    return yaml.safe_dump(document, sort_keys=False)


def verify(token: str, plane: ControlPlane, also: Any = None) -> str:
    """Verify ``token`` as ``plane``'s kube-apiserver would: its bundle plus its own key."""
    header = jwt.get_unverified_header(token)
    keys = {k.kid: k for k in parse_pem_bundle(plane.bundle.read_bytes())[0]}
    own = plane.key.public_key()
    keys_pem = {kid: k.public_pem for kid, k in keys.items()}
    keys_pem[kid_of(own)] = own.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pem = keys_pem.get(header["kid"])
    if pem is None:
        raise SystemExit(
            f"demo failed: kid {header['kid']} is not trusted by {plane.host}: "
            "this is the 401 Unauthorized sakeystate prevents"
        )
    claims = jwt.decode(
        token,
        serialization.load_pem_public_key(pem),
        algorithms=["ES512"],
        audience="https://kubernetes.default.svc",
        issuer=ISSUER,
    )
    return str(claims["sub"])


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="sakeystate-demo-"))
    etcd = EtcdServer(str(root))
    DEMO_ROOT.append(str(root))

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        say("Starting a throwaway etcd")
        etcd.start()
        print(f"etcd listening on {etcd.url}, data in {root}")

        planes = [ControlPlane(root, host) for host in HOSTS]
        trusted = [(p.kid, p.host) for p in planes]
        for plane in planes:
            plane.deploy(etcd.url, trusted)

        say("Each control plane publishes its own certificate (own_cert) under its kid")
        for plane in planes:
            run("publish", *plane.args())

        say("Converge every control plane (the reviewed state trusts the three kids)")
        for plane in planes:
            run("converge", *plane.args())
        run("converge", *planes[1].args(), "--detailed-exitcode")
        print("(second converge: nothing changed, no restart)")

        first = planes[0]
        old_token = first.sign_token("system:serviceaccount:kube-system:calico-node")
        print(f"\n{first.host} signed a token for calico-node with kid {first.kid}")

        say(f"Reimage {first.host}: a new key is created and published")
        old_kid = first.kid
        first.reimage()
        run("publish", *first.args())

        say(f"Plan on {first.host} itself: its old key joins its own bundle; peers wait")
        run("plan", *first.args(), "--detailed-exitcode", ok=(0, 2))

        say("Plan on ctrl1002 before review: the old key stays, the new one waits for review")
        run("plan", *planes[1].args(), "--detailed-exitcode", ok=(0, 2))

        say("A reviewer adds the new kid to the state file; the plan shown in code review")
        trusted.append((first.kid, first.host))
        for plane in planes:
            plane.deploy(etcd.url, trusted)
        run("plan", *planes[1].args(), "--format", "markdown")

        say("Converge every control plane again")
        for plane in planes:
            run("converge", *plane.args())

        say("Inspect the keys ctrl1002 sees")
        run("inspect", *planes[1].args())

        say("The token signed with the OLD key before the reimage still verifies")
        for plane in planes:
            subject = verify(old_token, plane)
            print(f"{plane.host}: token with kid {old_kid} verifies (sub={subject})")
        new_token = first.sign_token("system:serviceaccount:default:builder")
        for plane in planes[1:]:
            print(
                f"{plane.host}: token with new kid {first.kid} verifies "
                f"(sub={verify(new_token, plane)})"
            )
        restarts = {p.host: len(p.restarts.read_text().splitlines()) for p in planes}
        print(f"kube-apiserver restarts per control plane: {restarts}")
        print("\nDemo complete: no token stopped validating.")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        etcd.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
