"""What kube-apiserver itself does with odd ``--service-account-key-file`` contents, and
whether sakeystate's model of its reader (sakeystate/keys.py: Go's encoding/pem and
keyutil.ParsePublicKeysPEM) predicts it.

One apiserver per case, on its own etcd, given only the case's key files: does it
start (its supervisor's Type=notify start succeeds), and which kids does it
authenticate (one probe token per private key the harness holds, through its
TokenReview)? The model's answer for the same bytes: it starts when every file holds
at least one key keyutil loads (else keyutil's "data does not contain any valid RSA
or ECDSA public keys" stops it), and it verifies exactly the kids
``parse_pem_bundle`` returns. Every case runs on each configured release
(``SAKEYSTATE_E2E_KUBE``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sakeystate.keys import kid_of, parse_key_file, parse_pem_bundle

import binaries
from harness import Cluster, ControlPlane
from scenario import Board, agree

HOST = "ctrl2001.eqiad.example.org"


def public_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass
class Keys:
    """The key material of one case (every private key is held for probes): each case
    has keys of its own, so that one apiserver can load many cases at once and each
    verified kid still names its case."""

    a: ec.EllipticCurvePrivateKey
    b: ec.EllipticCurvePrivateKey
    a_cert: bytes
    intermediate_cert: bytes
    sec1: bytes  # an "EC PRIVATE KEY" block (key c)
    pkcs8: bytes  # a "PRIVATE KEY" block (key d)
    names: dict[str, str]  # kid -> a, b, c (SEC1), d (PKCS#8), intermediate CA

    def kids(self, files: list[bytes]) -> set[str]:
        """The kids this case can make an apiserver verify."""
        shared = {k for k, name in self.names.items() if name == "intermediate CA"}
        own = set(self.names) - shared
        return own | (shared if any(self.intermediate_cert in f for f in files) else set())


def comment(key: ec.EllipticCurvePrivateKey) -> bytes:
    """sakeystate's own bundle comment line: ``# <kid> <host> <published>``."""
    return f"# {kid_of(key.public_key())} {HOST} 2026-11-22T10:00:00Z\n".encode()


# Each case: the key files kube-apiserver is given (one per --service-account-key-file).
CASES: dict[str, Callable[[Keys], list[bytes]]] = {
    "one PUBLIC KEY block": lambda k: [public_pem(k.a)],
    "an empty file": lambda k: [b""],
    "a CERTIFICATE block": lambda k: [k.a_cert],
    "an intermediate CA certificate beside a key": lambda k: [
        public_pem(k.a) + k.intermediate_cert
    ],
    "a '# kid host published' comment above each block": lambda k: [
        comment(k.a) + public_pem(k.a) + comment(k.b) + public_pem(k.b)
    ],
    "the same bundle given twice": lambda k: [public_pem(k.a) + public_pem(k.b)] * 2,
    "an EC PRIVATE KEY (SEC1) block": lambda k: [public_pem(k.a) + k.sec1],
    "a PKCS#8 EC PRIVATE KEY block alone": lambda k: [k.pkcs8],
    "a PKCS#8 EC PRIVATE KEY block beside a key": lambda k: [k.pkcs8 + public_pem(k.a)],
    "a space after the first BEGIN line": lambda k: [
        public_pem(k.a).replace(b"KEY-----\n", b"KEY----- \n", 1) + public_pem(k.b)
    ],
    "CRLF line ends": lambda k: [(public_pem(k.a) + public_pem(k.b)).replace(b"\n", b"\r\n")],
    "a garbage block then a key": lambda k: [
        b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n" + public_pem(k.b)
    ],
}


Outcome = tuple[bool, str, set[str]]  # started, the error line if not, the kids verified


@dataclass
class Lab:
    """One apiserver, restarted with the key files of the cases: every case the model
    says starts in one run (each with its own keys), every other case alone."""

    cluster: Cluster
    plane: ControlPlane
    keys: Keys
    version: str
    case_keys: dict[str, Keys] = field(default_factory=dict)
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    def files(self, case: str) -> list[bytes]:
        if case not in self.case_keys:
            self.case_keys[case] = _keys(self.cluster)
        return CASES[case](self.case_keys[case])

    def outcome(self, case: str) -> Outcome:
        if case not in self.outcomes:
            if model(self.files(case))[0]:
                self._run_together([c for c in CASES if model(self.files(c))[0]])
            else:
                self.outcomes[case] = self.run(self.files(case))
        return self.outcomes[case]

    def _run_together(self, cases: list[str]) -> None:
        started, _error, verified = self.run([f for c in cases for f in self.files(c)])
        if not started:  # the model is wrong about one of them: which one, alone
            for case in cases:
                self.outcomes[case] = self.run(self.files(case))
            return
        for case in cases:
            self.outcomes[case] = (True, "", verified & self.case_keys[case].kids(self.files(case)))

    def run(self, files: list[bytes]) -> tuple[bool, str, set[str]]:
        """(started, the error line if it did not, the kids it authenticates)."""
        plane = self.plane
        paths = []
        for index, data in enumerate(files):
            path = plane.pki / f"case-{index}.pem"
            path.write_bytes(data)
            paths.append(str(path))
        plane.shutdown()
        plane.key_file_override = paths
        plane.launch_supervisor()
        reply = plane.unit("start")
        if not reply.startswith("ok"):
            log = plane.log_tail(40)
            errors = [line for line in log.splitlines() if "command failed" in line or "E1" in line]
            return False, (errors[-1] if errors else reply), set()
        plane.api.wait_ready(120)
        verified = {
            kid
            for kid in self.cluster.held
            if plane.api.review(self.cluster.probe(kid).value).authenticated
        }
        return True, "", verified


def _keys(cluster: Cluster) -> Keys:
    a = cluster.issue_sa("a.invalid")
    b, c, d = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    names = {}
    for key, name in ((a.key, "a"), (b, "b"), (c, "c (SEC1)"), (d, "d (PKCS#8)")):
        cluster.held[kid_of(key.public_key())] = key
        names[kid_of(key.public_key())] = name
    names[kid_of(cluster.sa_ca.key.public_key())] = "intermediate CA"
    return Keys(
        a=a.key,
        b=b,
        a_cert=a.pem,
        intermediate_cert=cluster.sa_ca.pem,
        sec1=c.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ),
        pkcs8=d.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        names=names,
    )


@pytest.fixture(scope="module", params=binaries.kube_versions())
def lab(
    request: pytest.FixtureRequest,
    namespaces: None,
    etcd_binary: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Lab]:
    version = str(request.param)
    binary = binaries.binary("kube-apiserver", version)
    cluster = Cluster(tmp_path_factory.mktemp(f"lab-{version}"), binary, numbers=(2001,))
    try:
        cluster.install()
        plane = cluster.planes[0]
        keys = _keys(cluster)
        plane.bundle.write_bytes(public_pem(keys.a))
        plane.start()
        cluster.make_workload(plane)
        yield Lab(cluster, plane, keys, version)
    finally:
        cluster.close()


def model(files: list[bytes]) -> tuple[bool, set[str]]:
    """What sakeystate's reader says kube-apiserver makes of these files."""
    kids: set[str] = set()
    starts = True
    for data in files:
        keys, _problems = parse_pem_bundle(data)
        starts = starts and bool(keys)
        kids |= {key.kid for key in keys}
    return starts, kids if starts else set()


@pytest.mark.parametrize("case", list(CASES))
def test_the_apiserver_reads_the_bundle_as_sakeystate_models_it(
    lab: Lab, case: str, board: Board
) -> None:
    files = lab.files(case)
    expected_start, expected_kids = model(files)
    started, error, verified = lab.outcome(case)
    names = lab.case_keys[case].names
    board.add(
        {
            "scenario": f"bundle: {case} ({lab.version})",
            "kind": "bundle",
            "started": started,
            "error": re.sub(r"^\S+ \S+\s+\d+ ", "", error)[:200],
            "verified": sorted(names.get(k, k[:8]) for k in verified),
            "model_agrees": (started, verified) == (expected_start, expected_kids),
        }
    )
    assert started == expected_start, (
        f"{case}: started {started}, model says {expected_start}: {error}"
    )
    assert verified == expected_kids, f"{case}: verifies {verified}, model says {expected_kids}"


def test_the_apiserver_given_its_leaf_alone_verifies_only_what_its_record_claims(
    lab: Lab, board: Board
) -> None:
    """Found here: docs/reimage.md used to give kube-apiserver the chained own_cert (leaf,
    then intermediate) as its own --service-account-key-file, and keyutil loads every
    CERTIFICATE block: the intermediate CA's key verified tokens too, though no status
    record said so. The docs now give it the leaf alone; this pins both halves."""
    own = lab.cluster.issue_sa(HOST)
    lab.cluster.held[own.kid] = own.key
    bundle = public_pem(lab.keys.b)
    # The record's claim: the bundle's kids plus the kid of own_cert (sakeystate's view).
    claimed = {parse_key_file(own.chained)[0].kid} | model([bundle])[1]
    intermediate = kid_of(lab.cluster.sa_ca.key.public_key())
    started, error, chained = lab.run([own.chained, bundle])
    assert started, error
    assert chained == claimed | {intermediate}  # why the docs say: never the chained file
    started, error, verified = lab.run([own.pem, bundle])
    assert started, error
    board.add(
        {
            "scenario": f"own key file = the leaf of own_cert ({lab.version})",
            "kind": "bundle",
            "started": started,
            "error": "",
            "verified": sorted(k[:8] for k in verified),
            "model_agrees": verified == claimed,
        }
    )
    agree(verified == claimed, f"verifies {sorted(verified)}, the record claims {sorted(claimed)}")


def test_a_bundle_path_that_does_not_exist_stops_the_apiserver(lab: Lab) -> None:
    """Why a reinstalled host must converge before its apiserver starts (R20): without the
    bundle file the apiserver does not start at all."""
    plane = lab.plane
    plane.shutdown()
    plane.key_file_override = [str(plane.pki / "no-such-bundle.pem")]
    plane.launch_supervisor()
    reply = plane.unit("start")
    assert reply.startswith("failed"), reply
    assert "no-such-bundle.pem" in plane.log_tail(40)


def test_legacy_tokens_verify_against_their_secret_and_by_kid(lab: Lab, board: Board) -> None:
    """What the built release accepts besides TokenRequest tokens: a legacy-format token
    (iss ``kubernetes/serviceaccount``, no exp) signed with a loaded key verifies while
    its ``kubernetes.io/service-account-token`` Secret holds it, and not once the Secret
    is gone. A token's kid picks the key: a wrong kid is rejected even with a good
    signature; a token without kid is tried against every loaded key."""
    import jwt

    from harness import ecdsa_alg

    cluster, plane, keys = lab.cluster, lab.plane, lab.keys
    started, error, _ = lab.run([public_pem(keys.a)])
    assert started, error
    legacy = cluster.legacy_token(keys.a, "lab")
    assert plane.api.review(legacy.value).authenticated
    claims = cluster.claims()
    wrong_kid = jwt.encode(
        claims, keys.a, algorithm=ecdsa_alg(keys.a), headers={"kid": kid_of(keys.b.public_key())}
    )
    no_kid = jwt.encode(claims, keys.a, algorithm=ecdsa_alg(keys.a))
    wrong = plane.api.review(wrong_kid)
    without = plane.api.review(no_kid)
    secret = jwt.decode(legacy.value, options={"verify_signature": False})[
        "kubernetes.io/serviceaccount/secret.name"
    ]
    plane.api.delete(f"/api/v1/namespaces/e2e/secrets/{secret}")
    # Successful authentications are cached (10 s by default): wait it out.
    deadline = time.monotonic() + 60
    while plane.api.review(legacy.value).authenticated:
        assert time.monotonic() < deadline, "a legacy token still verifies after its Secret is gone"
        time.sleep(1)
    board.add(
        {
            "scenario": f"legacy token, wrong kid, no kid ({lab.version})",
            "kind": "bundle",
            "started": True,
            "error": "",
            "verified": [
                "legacy token while its Secret exists",
                f"no kid: {'yes' if without.authenticated else 'no'}",
                f"wrong kid: {'yes' if wrong.authenticated else 'no'} ({wrong.error})",
            ],
            "model_agrees": not wrong.authenticated,
        }
    )
    assert not wrong.authenticated, "a token is checked against the keys of its kid only"
    assert without.authenticated, "a token without kid is tried against every loaded key"
