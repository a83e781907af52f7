"""The few kube-apiserver calls the end-to-end suite makes, over HTTPS with the admin
client certificate (``system:masters``): objects, ``TokenRequest``, ``TokenReview``.

Plain ``http.client``: no Kubernetes client library, so what is sent is exactly what
is written here. A connection error or a 5xx is ``Unavailable`` (an apiserver that is
restarting says nothing about a token); only a ``TokenReview`` answer decides whether
a token verifies.
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
from dataclasses import dataclass
from typing import Any


class Unavailable(Exception):
    """The apiserver did not answer (down, restarting, or a server error)."""


class ApiError(Exception):
    def __init__(self, status: int, body: Any, what: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {body}")
        self.status = status
        self.body = body


@dataclass(frozen=True)
class Review:
    authenticated: bool
    user: str | None
    error: str | None


class Api:
    def __init__(self, url: str, ca: str, cert: str, key: str) -> None:
        host, port = url.removeprefix("https://").rsplit(":", 1)
        self.url = url
        self.host, self.port = host, int(port)
        self.context = ssl.create_default_context(cafile=ca)
        self.context.check_hostname = False  # the serving certificate names the FQDN
        self.context.load_cert_chain(cert, key)
        self._conn: http.client.HTTPSConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = 10.0
    ) -> tuple[int, Any]:
        """One call on a kept-alive connection (reopened once if the server dropped it)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPSConnection(
                    self.host, self.port, context=self.context, timeout=timeout
                )
            try:
                self._conn.request(method, path, body=data, headers=headers)
                response = self._conn.getresponse()
                raw = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if attempt == 0 and not isinstance(exc, ConnectionRefusedError):
                    continue  # a kept-alive connection the previous process closed
                raise Unavailable(f"{self.url}: {exc}") from None
            if response.status >= 500:
                raise Unavailable(f"{self.url}{path}: HTTP {response.status}: {raw[:300]!r}")
            try:
                return response.status, json.loads(raw) if raw else None
            except ValueError:
                return response.status, raw.decode("utf-8", "replace")
        raise AssertionError("unreachable")

    def call(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = ()) -> Any:
        status, answer = self.request(method, path, body)
        if status >= 300 and status not in ok:
            raise ApiError(status, answer, f"{method} {path} on {self.url}")
        return answer

    # --- objects ----------------------------------------------------------------------------

    def ensure(self, collection: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create an object (or read it back when it exists): its manifest as stored."""
        name = manifest["metadata"]["name"]
        status, answer = self.request("POST", collection, manifest)
        if status == 409:
            return dict(self.call("GET", f"{collection}/{name}"))
        if status >= 300:
            raise ApiError(status, answer, f"POST {collection} on {self.url}")
        return dict(answer)

    def namespace(self, name: str) -> dict[str, Any]:
        return self.ensure(
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
        )

    def service_account(self, namespace: str, name: str) -> dict[str, Any]:
        return self.ensure(
            f"/api/v1/namespaces/{namespace}/serviceaccounts",
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
        )

    def secret(
        self,
        namespace: str,
        name: str,
        data: dict[str, str] | None = None,
        kind: str = "Opaque",
        annotations: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        manifest: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": kind,
            "metadata": {"name": name, "annotations": annotations or {}},
            "data": data or {},
        }
        return self.ensure(f"/api/v1/namespaces/{namespace}/secrets", manifest)

    def pod(self, namespace: str, name: str, service_account: str) -> dict[str, Any]:
        manifest = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "serviceAccountName": service_account,
                "automountServiceAccountToken": False,
                "containers": [{"name": "c", "image": "registry.invalid/pause:1"}],
            },
        }
        return self.ensure(f"/api/v1/namespaces/{namespace}/pods", manifest)

    def delete(self, path: str) -> None:
        self.call("DELETE", path, ok=(404,))

    # --- tokens -------------------------------------------------------------------------------

    def token_request(
        self,
        namespace: str,
        service_account: str,
        audiences: list[str],
        expiration: int = 3600,
        bound: dict[str, Any] | None = None,
    ) -> str:
        """A token from this apiserver's TokenRequest (signed with its signing key)."""
        spec: dict[str, Any] = {"audiences": audiences, "expirationSeconds": expiration}
        if bound is not None:
            spec["boundObjectRef"] = {
                "apiVersion": "v1",
                "kind": bound["kind"],
                "name": bound["metadata"]["name"],
                "uid": bound["metadata"]["uid"],
            }
        answer = self.call(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        return str(answer["status"]["token"])

    def review(self, token: str) -> Review:
        """This apiserver's TokenReview of ``token`` (its default audiences)."""
        answer = self.call(
            "POST",
            "/apis/authentication.k8s.io/v1/tokenreviews",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": {"token": token},
            },
        )
        status = answer.get("status", {})
        user = status.get("user", {}).get("username")
        return Review(bool(status.get("authenticated")), user, status.get("error"))

    def ready(self, timeout: float = 3.0) -> bool:
        try:
            status, _ = self.request("GET", "/readyz", timeout=timeout)
        except Unavailable:
            return False
        return status == 200

    def wait_ready(self, timeout: float) -> float:
        """Poll /readyz until it passes; the moment it did (time.time())."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return time.time()
            time.sleep(0.1)
        raise Unavailable(f"{self.url}: /readyz did not pass within {timeout:g}s")
