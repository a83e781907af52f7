"""Service-account tokens for the tests, signed and verified with PyJWT (never by hand)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from sakeystate.keys import parse_pem_bundle

from support import T0, kid

_EC_ALGS = {256: "ES256", 384: "ES384", 521: "ES512"}
SIGNATURE_ONLY = {
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
}


def alg_of(key: Any) -> str:
    """The algorithm kube-apiserver signs with for this private key."""
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return _EC_ALGS[key.curve.key_size]


def sign(
    key: Any,
    *,
    issued: datetime = T0,
    lifetime: timedelta = timedelta(days=365),
    namespace: str = "kube-system",
    pod: str = "calico-node-x7f2k",
    **header: Any,
) -> str:
    """A projected service-account token as kube-apiserver issues it, signed by ``key``."""
    iat = int(issued.timestamp())
    claims = {
        "aud": ["https://kubernetes.default.svc"],
        "iss": "https://kubernetes.default.svc",
        "sub": f"system:serviceaccount:{namespace}:calico-node",
        "iat": iat,
        "nbf": iat,
        "exp": iat + int(lifetime.total_seconds()),
        "kubernetes.io": {
            "namespace": namespace,
            "pod": {"name": pod, "uid": "0d6b0c4e-4a1f-4c7e-9a0e-3b2f1e5d6c7a"},
            "serviceaccount": {
                "name": "calico-node",
                "uid": "5f1c2e8a-7b3d-4e9f-8a1b-2c3d4e5f6a7b",
            },
            "warnafter": iat + 3607,
        },
    }
    headers = {"kid": kid(key), **header}
    return jwt.encode(claims, key, algorithm=alg_of(key), headers=headers)


def public_alg(public: Any) -> str:
    """The one algorithm a public key verifies: RS256 for RSA, ES256/384/512 by curve."""
    if isinstance(public, rsa.RSAPublicKey):
        return "RS256"
    assert isinstance(public, ec.EllipticCurvePublicKey)
    return _EC_ALGS[public.curve.key_size]


def verifies_with_bundle(token: str, bundle: bytes) -> bool:
    """Does a bundle (certificates or public keys) hold the token's key, and does it verify?

    Only the signature is checked: key presence is what these tests are about, and
    the wall clock must not decide a test.
    """
    keys, _problems = parse_pem_bundle(bundle)
    wanted = jwt.get_unverified_header(token)["kid"]
    for info in keys:
        if info.kid != wanted:
            continue
        public = load_pem_public_key(info.public_pem)
        try:
            jwt.decode(token, public, algorithms=[public_alg(public)], options=SIGNATURE_ONLY)
        except jwt.InvalidSignatureError:
            return False
        return True
    return False
