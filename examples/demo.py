"""The sakeystate demo: three control planes, a reimage, and tokens that keep working.

Starts a throwaway local etcd and a cfssl-style cluster PKI (a root, an
intermediate, a P-521 service-account certificate per control plane with subject
CN ``sa`` and no SAN, chained ``leaf + intermediate`` files). Every control plane
runs the cluster's one reviewed state file (``host: self``, ``exclude_host:
self``, a trust anchor for the cluster CA with ``common_name: sa``) with its own
``--host``. They publish and converge; then one is reimaged (new key, new
certificate): it publishes, ``status`` shows the peers lagging, each peer
converges once with no edit to the state file, ``wait --cert`` returns, and
tokens signed with the OLD key and with the NEW key verify on every control
plane. Everything runs through the real `sakeystate` command. Its etcd and
temporary files are removed on exit, also on Ctrl-C.
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

    def __init__(self, root: Path, host: str, ca: ClusterCa) -> None:
        self.host, self.ca = host, ca
        self.dir = root / host.split(".")[0]
        self.dir.mkdir()
        self.bundle = self.dir / "kube-apiserver-sa-certs.pem"
        self.state = self.dir / "state.yaml"
        self.restarts = self.dir / "restarts.log"  # written by the state's reload command
        self.key: Any = None
        self.reimage()

    def reimage(self) -> None:
        """A fresh install: a new P-521 key, and the PKI's service-account certificate for
        it (subject CN ``sa``, no SAN), written with its intermediate as cfssl bundles it."""
        self.key = ec.generate_private_key(ec.SECP521R1())
        leaf = self.ca.issue(self.key.public_key(), "sa")
        (self.dir / "sa.pem").write_bytes(leaf + self.ca.intermediate_pem)

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

    def deploy(self, etcd_url: str, ca_file: Path) -> None:
        """Install the cluster's one reviewed state file on this control plane."""
        self.state.write_text(reviewed_state(etcd_url, ca_file, self.dir))


class ClusterCa:
    """An offline root and the cluster's intermediate, as cfssl sets them up."""

    def __init__(self) -> None:
        self.root_key = ec.generate_private_key(ec.SECP384R1())
        self.key = ec.generate_private_key(ec.SECP384R1())
        root_name = _name("demo Root CA")
        self.root = _sign(root_name, self.root_key.public_key(), root_name, self.root_key, None)
        self.name = _name("demo wikikube intermediate")
        self.intermediate = _sign(self.name, self.key.public_key(), root_name, self.root_key, 0)
        self.intermediate_pem = self.intermediate.public_bytes(serialization.Encoding.PEM)

    def issue(self, public_key: Any, cn: str) -> bytes:
        cert = _sign(_name(cn), public_key, self.name, self.key, "leaf")
        return cert.public_bytes(serialization.Encoding.PEM)

    def write_ca_file(self, path: Path) -> Path:
        path.write_bytes(self.root.public_bytes(serialization.Encoding.PEM))
        return path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _sign(
    subject: x509.Name, public_key: Any, issuer: x509.Name, key: Any, path_length: int | str | None
) -> Any:
    """A certificate; ``path_length`` "leaf" for an end entity, else a CA's path length."""
    ca = path_length != "leaf"
    now = datetime.now(UTC)
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=not ca,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=3650 if ca else 365))
        .add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None),  # type: ignore[arg-type]
            True,
        )
        .add_extension(usage, True)
        .sign(key, hashes.SHA384())
    )


def reviewed_state(etcd_url: str, ca_file: Path, root: Path) -> str:
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
        "fleet": list(HOSTS),
        "etcd": {
            "endpoints": [etcd_url],
            "prefix": "/kube-apiserver-sa-certs/",
            "status_prefix": "/kube-apiserver-sa-status/",
            "timeout": "5s",
        },
        "bundle": {
            "path": str(root / "kube-apiserver-sa-certs.pem"),
            "mode": "0644",
            "exclude_host": "self",
            "reload": reload,
        },
        # Keys the cluster CA certifies for these hosts as CN sa: no per-key review.
        "trust_anchors": [
            {"name": "demo-pki", "ca_file": str(ca_file), "hosts": list(HOSTS), "common_name": "sa"}
        ],
        "trusted": [],
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

        say("A cfssl-style cluster PKI: root, intermediate, CN sa leaves, chained files")
        ca = ClusterCa()
        ca_file = ca.write_ca_file(root / "cluster-ca.pem")
        planes = [ControlPlane(root, host, ca) for host in HOSTS]
        for plane in planes:
            plane.deploy(etcd.url, ca_file)
        print("the state file trusts the cluster CA (trust_anchors, common_name: sa); trusted: []")

        say("Each control plane publishes its own certificate (own_cert) under its kid")
        for plane in planes:
            run("publish", *plane.args())

        say("Converge every control plane (the anchor certifies every key)")
        for plane in planes:
            run("converge", *plane.args())
        run("converge", *planes[1].args(), "--detailed-exitcode")
        print("(second converge: nothing changed, no restart, no etcd write)")
        run("status", *planes[1].args())

        first = planes[0]
        old_token = first.sign_token("system:serviceaccount:kube-system:calico-node")
        print(f"\n{first.host} signed a token for calico-node with kid {first.kid}")

        say(f"Reimage {first.host}: a new key, a new certificate from the cluster CA, published")
        old_kid = first.kid
        first.reimage()
        run("publish", *first.args())
        new_token = first.sign_token("system:serviceaccount:default:builder")
        print(f"{first.host} now signs with kid {first.kid}")

        say("The fleet view: the peers do not verify the new key yet (exit 2)")
        run("status", *planes[1].args(), ok=(2,))
        say(f"The gate before pooling {first.host}: wait times out while peers lag")
        run("wait", *first.args(), "--cert", str(first.dir / "sa.pem"), "--timeout", "1s", ok=(1,))

        say("Each control plane converges once (its next Puppet run, or watch); nobody edits state")
        for plane in planes:
            run("converge", *plane.args())
        run("wait", *first.args(), "--cert", str(first.dir / "sa.pem"), "--timeout", "30s")
        run("status", *planes[1].args())

        say("Inspect the keys ctrl1002 sees")
        run("inspect", *planes[1].args())

        say("Tokens of the OLD key (before the reimage) and of the NEW key verify everywhere")
        for plane in planes:
            subject = verify(old_token, plane)
            print(f"{plane.host}: token with kid {old_kid} verifies (sub={subject})")
        for plane in planes:
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
