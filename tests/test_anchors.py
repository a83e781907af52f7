"""Trust anchors: which certificates a cluster CA certifies for which Host (contract, "Trust").

Every case is built from tests/pki.py's cfssl-shaped PKI and asserts the
verdict and its reason, as reports will print it.
"""

from __future__ import annotations

import base64
from datetime import datetime, timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sakeystate.anchors import Anchor, Verdict, load_roots, verify, verify_any
from sakeystate.errors import SakeystateError

from pki import T0, Ca, Leaf, Pki, host, self_signed

PKI = Pki()
OTHER = Pki(org="Example Corp")  # an unrelated root and intermediate, same CN for both
FLEET = (host(1001), host(1002), host(1003))
NAME = "wikikube-eqiad-pki"
INTERMEDIATE = "wikikube-eqiad Intermediate CA"
SA = Anchor(NAME, PKI.ca_file(), FLEET, common_name="sa")
NAMED = Anchor(NAME, PKI.ca_file(), FLEET)


def check(
    anchor: Anchor,
    leaf: Leaf,
    host_header: str | None,
    intermediates: tuple[bytes, ...] | None = None,
    at: datetime = T0,
) -> Verdict:
    """Verify a value as etcd holds it: cfssl's chained file, split into leaf and intermediates."""
    chain = leaf.intermediate_pems if intermediates is None else intermediates
    return verify(anchor, leaf.pem, chain, host_header, at)


def trusted_for(host_header: str) -> Verdict:
    return Verdict(
        True, f"anchor {NAME}: certificate for {host_header} issued by {INTERMEDIATE}", INTERMEDIATE
    )


# --- trusted ------------------------------------------------------------------------------


def test_san_named_p521_leaf_with_its_intermediate_is_trusted_for_its_host() -> None:
    leaf = PKI.sa_named(host(1002))
    assert leaf.alg == "ES512"
    assert check(NAMED, leaf, host(1002)) == trusted_for(host(1002))


def test_cn_sa_leaf_without_san_is_trusted_by_an_anchor_requiring_cn_sa() -> None:
    assert check(SA, PKI.sa(), host(1002)) == trusted_for(host(1002))


def test_p256_leaf_under_an_rsa_root_is_trusted() -> None:
    rsa_pki = Pki(org="RSA Rooted", root_kind="rsa")
    leaf = rsa_pki.sa(curve="p256")
    anchor = Anchor(NAME, rsa_pki.ca_file(), FLEET, "sa")
    assert leaf.alg == "ES256"
    assert check(anchor, leaf, host(1001)) == trusted_for(host(1001))


def test_same_key_renewal_is_trusted_under_the_same_kid() -> None:
    leaf = PKI.sa()
    renewal = PKI.renew(leaf)
    assert renewal.kid == leaf.kid
    assert renewal.cert.serial_number != leaf.cert.serial_number
    assert check(SA, renewal, host(1003), at=T0 + timedelta(days=310)).trusted


def test_leaf_whose_not_after_passed_is_not_certified_now() -> None:
    """R14: anchors verify as of now. A key whose certificate has expired keeps its trust
    through the bundle (the planner's rule, tests/test_fault_isolation.py), never
    through an anchor choosing a moment the certificate likes."""
    late = PKI.sa(not_before=T0 - timedelta(days=366), not_after=T0 - timedelta(days=1))
    assert check(SA, late, host(1002), at=T0 - timedelta(days=2)) == trusted_for(host(1002))
    verdict = check(SA, late, host(1002), at=T0)
    assert not verdict.trusted and "cert is not valid at validation time" in verdict.reason


def test_a_leaf_at_most_clock_skew_ahead_is_trusted_and_one_further_ahead_is_not() -> None:
    soon = PKI.sa(not_before=T0 + timedelta(minutes=4))
    assert check(SA, soon, host(1002)) == trusted_for(host(1002))
    later = PKI.sa(not_before=T0 + timedelta(minutes=6))
    assert not check(SA, later, host(1002)).trusted
    strict = Anchor(NAME, PKI.ca_file(), FLEET, "sa", clock_skew=timedelta(0))
    assert not check(strict, soon, host(1002)).trusted


def test_a_retired_or_future_ca_never_certifies_a_leaf_dated_into_its_validity() -> None:
    """R14's findings: a leaf backdated into an expired intermediate's validity, one under
    an expired root, and one future-dated under a not-yet-valid intermediate."""
    expired = PKI.expired_intermediate()
    backdated = PKI.sa(
        issuer=expired, not_before=T0 - timedelta(days=300), not_after=T0 - timedelta(days=31)
    )
    assert not check(SA, backdated, host(1002)).trusted
    future_ca = PKI.intermediate(
        "future", not_before=T0 + timedelta(days=10), not_after=T0 + timedelta(days=400)
    )
    future = PKI.sa(issuer=future_ca, not_before=T0 + timedelta(days=11))
    assert not check(SA, future, host(1002)).trusted
    old_root = Pki(
        org="Retired Root",
        root_not_before=T0 - timedelta(days=900),
        root_not_after=T0 - timedelta(days=100),
    )
    under_old_root = old_root.sa(
        issuer=old_root.intermediate(
            not_before=T0 - timedelta(days=800), not_after=T0 - timedelta(days=101)
        ),
        not_before=T0 - timedelta(days=700),
        not_after=T0 - timedelta(days=102),
    )
    anchor = Anchor(NAME, old_root.ca_file(), FLEET, "sa")
    assert not check(anchor, under_old_root, host(1002)).trusted


def test_ca_file_holding_root_and_intermediate_lets_a_lone_leaf_chain() -> None:
    anchor = Anchor(NAME, PKI.ca_file(with_intermediate=True), FLEET, "sa")
    assert check(anchor, PKI.sa(), host(1002), intermediates=()) == trusted_for(host(1002))


def test_host_header_matches_hosts_and_sans_case_insensitively() -> None:
    leaf = PKI.sa_named(host(1001))
    assert check(NAMED, leaf, host(1001).upper()).trusted


def test_without_common_name_the_hosts_serving_certificate_is_trusted() -> None:
    """Documented consequence: the same CA's serving certificate names the host."""
    serving = PKI.apiserver(host(1002))
    assert check(NAMED, serving, host(1002)) == trusted_for(host(1002))
    cn = host(1002)
    assert check(SA, serving, host(1002)) == Verdict(
        False, f"anchor {NAME}: leaf CN {cn!r} is not 'sa'"
    )


def test_leaf_with_any_eku_or_none_and_no_aki_is_trusted() -> None:
    """The verifier's web-PKI profile is relaxed for these only: cfssl profiles differ there."""
    for leaf in (
        PKI.sa(eku="client"),
        PKI.sa(eku="server"),
        PKI.sa(aki=False),
        PKI.sa(issuer=PKI.intermediate("server-only", eku="server")),
    ):
        issuer = leaf.issuer
        assert issuer is not None
        expected = f"anchor {NAME}: certificate for {host(1001)} issued by {issuer.cn}"
        assert check(SA, leaf, host(1001)) == Verdict(True, expected, issuer.cn)


def test_ca_file_listing_the_leaf_itself_trusts_it_naming_its_issuer() -> None:
    leaf = PKI.sa()
    anchor = Anchor(NAME, leaf.pem, FLEET, "sa")
    assert check(anchor, leaf, host(1002), intermediates=()) == trusted_for(host(1002))


# --- not trusted --------------------------------------------------------------------------


def _chain_failure(issuer: Ca, detail: str) -> Verdict:
    return Verdict(
        False,
        f"anchor {NAME}: certificate issued by {issuer.cert.subject.rfc4514_string()!r} "
        f"does not chain to the anchor's ca_file (validation failed: {detail})",
    )


NO_ISSUER = "candidates exhausted: all candidates exhausted with no interior errors"


def test_leaf_from_another_ca_is_not_trusted() -> None:
    foreign = OTHER.sa()
    assert foreign.issuer is not None and foreign.issuer.cn == INTERMEDIATE
    assert check(SA, foreign, host(1002)) == _chain_failure(foreign.issuer, NO_ISSUER)


def test_leaf_from_the_right_ca_for_a_host_outside_hosts_is_not_trusted() -> None:
    outsider = host(2001, site="codfw")
    assert check(SA, PKI.sa(), outsider) == Verdict(
        False, f"anchor {NAME}: host {outsider} not in the anchor's hosts"
    )


def test_leaf_naming_another_fleet_host_is_not_trusted_for_this_host() -> None:
    leaf = PKI.sa_named(host(1003))
    assert check(NAMED, leaf, host(1002)) == Verdict(
        False, f"anchor {NAME}: leaf names ({host(1003)}) do not include Host {host(1002)}"
    )


def test_cn_sa_leaf_is_not_trusted_without_common_name() -> None:
    assert check(NAMED, PKI.sa(), host(1002)) == Verdict(
        False, f"anchor {NAME}: leaf names (none) do not include Host {host(1002)}"
    )


def test_kubelet_client_certificate_from_the_same_intermediate_is_not_trusted() -> None:
    kubelet = PKI.kubelet(host(1002))
    expected = f"anchor {NAME}: leaf CN 'system:node:{host(1002)}' is not 'sa'"
    assert check(SA, kubelet, host(1002)) == Verdict(False, expected)
    assert check(NAMED, kubelet, host(1002)) == Verdict(
        False, f"anchor {NAME}: leaf names (none) do not include Host {host(1002)}"
    )


def test_admin_certificate_from_the_same_intermediate_is_not_trusted() -> None:
    assert check(SA, PKI.admin(), host(1002)) == Verdict(
        False, f"anchor {NAME}: leaf CN 'admin' is not 'sa'"
    )


def test_intermediate_ca_certificate_as_the_leaf_is_not_trusted() -> None:
    intermediate = PKI.intermediate()
    as_leaf = Leaf(intermediate.cert, PKI.sa().key, PKI.root)
    detail = "basicConstraints.cA must not be asserted in an EE certificate"
    assert check(SA, as_leaf, host(1002), intermediates=()) == _chain_failure(PKI.root, detail)


def test_ca_leaf_named_sa_is_not_trusted() -> None:
    ca_leaf = PKI.leaf(ca=True)
    detail = "basicConstraints.cA must not be asserted in an EE certificate"
    assert check(SA, ca_leaf, host(1002)) == _chain_failure(PKI.intermediate(), detail)


def test_leaf_issued_by_a_non_ca_certificate_is_not_trusted() -> None:
    not_a_ca = PKI.sa()
    pretender = Ca(not_a_ca.cert, not_a_ca.key, PKI.intermediate())
    leaf = PKI.sa(issuer=pretender)
    detail = "candidates exhausted: basicConstraints.cA must be asserted in a CA certificate"
    assert check(SA, leaf, host(1002)) == _chain_failure(pretender, detail)


def test_path_length_zero_intermediate_cannot_issue_another_ca() -> None:
    sub = PKI.intermediate("sub", parent=PKI.intermediate())
    leaf = PKI.sa(issuer=sub)
    detail = "candidates exhausted: path length constraint violated"
    assert check(SA, leaf, host(1002)) == _chain_failure(sub, detail)


def test_self_signed_certificate_for_a_fleet_host_is_not_trusted() -> None:
    forged = self_signed(host(1002))
    leaf_subject = forged.cert.subject.rfc4514_string()
    assert check(NAMED, forged, host(1002), intermediates=()) == Verdict(
        False,
        f"anchor {NAME}: certificate issued by {leaf_subject!r} does not chain to "
        f"the anchor's ca_file (validation failed: {NO_ISSUER})",
    )


def test_leaf_under_an_intermediate_that_expired_before_at_is_not_trusted() -> None:
    expired = PKI.expired_intermediate()
    leaf = PKI.sa(issuer=expired, not_before=T0 - timedelta(days=60))
    detail = "candidates exhausted: cert is not valid at validation time"
    assert check(SA, leaf, host(1002)) == _chain_failure(expired, detail)


def test_not_yet_valid_leaf_is_not_trusted_before_its_not_before() -> None:
    """As the contract says, verification time is min(at, notAfter): notBefore still counts."""
    early = PKI.sa(not_before=T0 + timedelta(hours=1))
    detail = "cert is not valid at validation time"
    assert check(SA, early, host(1002)) == _chain_failure(PKI.intermediate(), detail)
    assert check(SA, early, host(1002), at=T0 + timedelta(hours=2)).trusted


def test_leaf_without_its_intermediate_is_not_trusted_when_ca_file_holds_only_the_root() -> None:
    """The verifier only says "candidates exhausted"; the operator is told what to do."""
    leaf = PKI.sa()
    assert check(SA, leaf, host(1002), intermediates=()) == Verdict(
        False,
        f"anchor {NAME}: no issuer of {leaf.cert.subject.rfc4514_string()!r} (issued by "
        f"{PKI.intermediate().cert.subject.rfc4514_string()!r}) in the value or in the "
        "anchor's ca_file: publish the chained file (leaf, then intermediate) or add the "
        "intermediate to ca_file",
    )


@pytest.mark.parametrize(
    "garbage",
    [b"garbage", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", b""],
)
def test_garbage_intermediate_is_not_trusted(garbage: bytes) -> None:
    leaf = PKI.sa()
    verdict = check(SA, leaf, host(1002), intermediates=(*leaf.intermediate_pems, garbage))
    assert not verdict.trusted
    assert verdict.reason.startswith(f"anchor {NAME}: intermediate 2 cannot be parsed: ")


def test_bare_public_key_cannot_be_verified() -> None:
    public_pem = (
        PKI.sa()
        .key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    expected = f"anchor {NAME}: no certificate (a bare PUBLIC KEY cannot be verified)"
    assert verify(SA, public_pem, (), host(1002), T0) == Verdict(False, expected)
    assert verify(SA, None, (), host(1002), T0) == Verdict(False, expected)


def test_value_without_host_header_is_not_trusted() -> None:
    leaf = PKI.sa()
    assert check(SA, leaf, None) == Verdict(False, f"anchor {NAME}: no Host header")
    assert verify_any([SA], leaf.pem, leaf.intermediate_pems, "", T0) == Verdict(
        False, "no Host header"
    )


# --- several anchors ----------------------------------------------------------------------


def test_first_anchor_that_trusts_the_value_wins() -> None:
    foreign = Anchor("example-corp", OTHER.ca_file(), FLEET, "sa")
    leaf = PKI.sa()
    verdict = verify_any([foreign, SA, NAMED], leaf.pem, leaf.intermediate_pems, host(1001), T0)
    assert verdict == trusted_for(host(1001))


def test_no_anchor_trusting_the_value_names_each_anchors_reason() -> None:
    foreign = Anchor("example-corp", OTHER.ca_file(), FLEET, "sa")
    leaf = PKI.kubelet(host(1001))
    verdict = verify_any([foreign, SA], leaf.pem, leaf.intermediate_pems, host(1001), T0)
    assert not verdict.trusted
    first, second = verdict.reason.split("; ")
    assert first.startswith("anchor example-corp: certificate issued by ")
    assert first.endswith(
        f"does not chain to the anchor's ca_file (validation failed: {NO_ISSUER})"
    )
    assert second == f"anchor {NAME}: leaf CN 'system:node:{host(1001)}' is not 'sa'"
    assert verify_any([], leaf.pem, (), host(1001), T0) == Verdict(False, "no trust anchors")


# --- the anchor's ca_file -----------------------------------------------------------------


def test_load_roots_returns_every_certificate_of_the_ca_file() -> None:
    roots = load_roots(PKI.ca_file(with_intermediate=True), "/etc/sakeystate/ca.pem")
    assert roots == [PKI.root.cert, PKI.intermediate().cert]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "no CERTIFICATE PEM block found"),
        (b"not a pem file\n", "no CERTIFICATE PEM block found"),
        (PKI.sa().key_pem, "contains a private key; a CA file holds certificates"),
        (PKI.root.pem + PKI.sa().key_pem, "contains a private key; a CA file holds certificates"),
        (
            PKI.root.pem
            + PKI.sa()
            .key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            "holds a PUBLIC KEY PEM block; a CA file holds only CERTIFICATE blocks",
        ),
        (
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "a certificate cannot be parsed: ",
        ),
    ],
)
def test_load_roots_refuses_a_file_without_usable_certificates(
    content: bytes, problem: str
) -> None:
    with pytest.raises(SakeystateError) as caught:
        load_roots(content, "/etc/sakeystate/ca.pem")
    assert str(caught.value).startswith(f"/etc/sakeystate/ca.pem: {problem}")
    assert b"PRIVATE" not in str(caught.value).encode()


def test_verify_with_an_unusable_ca_file_raises_the_tools_error_naming_the_anchor() -> None:
    broken = Anchor("broken-pki", b"nothing here", FLEET, "sa")
    with pytest.raises(SakeystateError, match="trust anchor broken-pki: ca_file: no CERTIFICATE"):
        check(broken, PKI.sa(), host(1002))


# --- hostile bytes ------------------------------------------------------------------------

_LEAF = PKI.sa()
_DER = _LEAF.cert.public_bytes(serialization.Encoding.DER)


def _as_pem(der: bytes) -> bytes:
    body = base64.encodebytes(der)
    return b"-----BEGIN CERTIFICATE-----\n" + body + b"-----END CERTIFICATE-----\n"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    leaf=st.one_of(st.none(), st.binary(max_size=300)),
    intermediates=st.lists(st.binary(max_size=200), max_size=3),
    host_header=st.one_of(st.none(), st.text(max_size=40), st.sampled_from(FLEET)),
)
def test_random_bytes_never_raise(
    leaf: bytes | None, intermediates: list[bytes], host_header: str | None
) -> None:
    verdict = verify_any([SA, NAMED], leaf, tuple(intermediates), host_header, T0)
    assert not verdict.trusted
    assert verdict.reason


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    position=st.integers(min_value=0, max_value=len(_DER) - 1),
    byte=st.integers(min_value=0, max_value=255),
    cut=st.integers(min_value=1, max_value=len(_DER)),
    in_intermediate=st.booleans(),
)
def test_corrupted_certificates_never_raise(
    position: int, byte: int, cut: int, in_intermediate: bool
) -> None:
    """A real certificate with one byte changed or its tail cut: parsers see near-valid DER."""
    der = (_DER[:position] + bytes([byte]) + _DER[position + 1 :])[:cut]
    leaf, intermediates = (_LEAF.pem, (_as_pem(der),)) if in_intermediate else (_as_pem(der), ())
    verdict = verify_any([SA, NAMED], leaf, intermediates + _LEAF.intermediate_pems, host(1002), T0)
    assert isinstance(verdict, Verdict)
    if verdict.trusted:
        # Only a change the signature does not cover (outside the TBS) can leave it trusted.
        assert verdict == trusted_for(host(1002))
