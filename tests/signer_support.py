"""Helpers for the signer tests: a host with its key files, the signer process, a client.

The client is a real gRPC client on the unix socket, calling the same full method
names kube-apiserver calls (``/v1.ExternalJWTSigner/...``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization

from sakeystate import externaljwt

from support import kid, make_cert
from watch_support import WatchProcess, wait_for

HOST = "ctrl1001.example.org"
PEER = "ctrl1002.example.org"


def key_pem(key: Any) -> bytes:
    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**fields: Any) -> str:
    """A payload segment as kube-apiserver sends it (base64url JSON, no padding)."""
    payload = {"iss": "https://kubernetes.default.svc", "sub": "system:serviceaccount:a:b"}
    return b64url(json.dumps({**payload, **fields}).encode())


@contextlib.contextmanager
def socket_dir(mode: int = 0o755) -> Iterator[Path]:
    """A directory for the socket that other users can traverse (pytest's tmp_path is
    0700, which alone would keep ``nobody`` out, whatever the socket's mode)."""
    path = Path(tempfile.mkdtemp(prefix="sakeystate-signer-test-", dir="/tmp"))
    path.chmod(mode)
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


@dataclass
class SignerHost:
    """This host's files: private key (0600), own_cert, and where the socket goes."""

    key: Any
    key_file: Path
    cert_file: Path
    socket: Path

    @property
    def kid(self) -> str:
        return kid(self.key)

    def signer_section(self, **overrides: Any) -> dict[str, Any]:
        section = {"socket": str(self.socket), "private_key_file": str(self.key_file)}
        return {**section, **overrides}


def signer_host(tmp: Path, sockets: Path, key: Any, host: str = HOST) -> SignerHost:
    key_file = tmp / "sa.key"
    key_file.write_bytes(key_pem(key))
    key_file.chmod(0o600)
    cert_file = tmp / "sa.pem"
    cert_file.write_bytes(make_cert(key, host))
    return SignerHost(key, key_file, cert_file, sockets / "signer.sock")


class SignerProcess(WatchProcess):
    """``sakeystate signer`` as a separate process, its stderr in a file."""

    COMMAND = "signer"

    def passes(self) -> int:
        return self.output.count("sakeystate watch: pass ")

    def wait_passes(self, count: int, timeout: float = 60.0) -> None:
        wait_for(f"{count} passes", lambda: self.passes() >= count or self.exited(), timeout)
        assert not self.exited(), self.output

    def exited(self) -> bool:
        return self.proc.poll() is not None


class Client:
    """A gRPC client of the signer's socket."""

    def __init__(self, path: Path | str) -> None:
        self.channel = grpc.insecure_channel(f"unix:{path}")
        self.calls = externaljwt.client(self.channel)

    def fetch_keys(self) -> Any:
        return self.calls["FetchKeys"](externaljwt.FetchKeysRequest(), timeout=10)

    def sign(self, payload: str) -> Any:
        return self.calls["Sign"](externaljwt.SignJWTRequest(claims=payload), timeout=10)

    def metadata(self) -> Any:
        return self.calls["Metadata"](externaljwt.MetadataRequest(), timeout=10)

    def kids(self) -> list[str]:
        return [k.key_id for k in self.fetch_keys().keys]

    def close(self) -> None:
        self.channel.close()


def wait_for_socket(path: Path, process: SignerProcess, timeout: float = 60.0) -> None:
    wait_for(f"the socket {path}", lambda: path.exists() or process.exited(), timeout)
    assert not process.exited(), process.output


def wait_for_kids(client: Client, expected: set[str], timeout: float = 60.0) -> None:
    def served() -> bool:
        try:
            return set(client.kids()) == expected
        except grpc.RpcError:
            return False

    wait_for(f"FetchKeys to serve {sorted(expected)}", served, timeout)
