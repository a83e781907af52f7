"""Loopback proxies in front of a real etcd, for fault injection (never a fake etcd).

- ``TcpProxy`` forwards bytes; it can stall (stop forwarding, keep every connection
  open: a member whose network hangs) and cut (close every connection at once).
  TLS passes through it untouched.
- ``GrpcProxy`` is a gRPC server that forwards every etcd method, as raw bytes, to a
  real etcd; a rule makes one method answer a given status code instead (at once, or
  after forwarding some stream responses), or answer late. What etcd decides is never
  imitated: the proxy only withholds or delays etcd's own answers.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

from etcd_server import free_port

STREAMS = {"/etcdserverpb.Watch/Watch", "/etcdserverpb.Lease/LeaseKeepAlive"}


class TcpProxy:
    """127.0.0.1:<port> -> upstream, one thread, select()-driven."""

    def __init__(self, upstream_port: int, port: int | None = None) -> None:
        self.upstream_port = upstream_port
        self.port = port or free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self._listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._pairs: dict[socket.socket, socket.socket] = {}
        self._stalled = threading.Event()
        self._cut = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tcp-proxy")
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stall(self) -> None:
        """Stop forwarding; connections stay open and new ones are accepted (and hang)."""
        self._stalled.set()

    def resume(self) -> None:
        self._stalled.clear()

    def cut(self) -> None:
        """Close every open connection (new ones still go through)."""
        self._cut.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in list(self._pairs):
            with contextlib.suppress(OSError):
                sock.close()
        self._listener.close()
        self._selector.close()

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=2)
        except OSError:
            client.close()
            return
        for sock in (client, upstream):
            sock.setblocking(False)
        self._pairs[client], self._pairs[upstream] = upstream, client
        self._selector.register(client, selectors.EVENT_READ, "data")
        self._selector.register(upstream, selectors.EVENT_READ, "data")

    def _close_pair(self, sock: socket.socket) -> None:
        other = self._pairs.pop(sock, None)
        for each in (sock, other):
            if each is None:
                continue
            self._pairs.pop(each, None)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(each)
            with contextlib.suppress(OSError):
                each.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._cut.is_set():
                for sock in list(self._pairs):
                    self._close_pair(sock)
                self._cut.clear()
            if self._stalled.is_set():
                # Accept (so that connects succeed and then hang), forward nothing.
                for key, _ in self._selector.select(timeout=0.05):
                    if key.data is None:
                        self._accept()
                time.sleep(0.02)
                continue
            for key, _ in self._selector.select(timeout=0.05):
                if key.data is None:
                    self._accept()
                    continue
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._close_pair(sock)
                    continue
                other = self._pairs.get(sock)
                if other is None:
                    continue
                try:
                    other.setblocking(True)
                    other.sendall(data)
                    other.setblocking(False)
                except OSError:
                    self._close_pair(sock)


@dataclass
class Rule:
    code: grpc.StatusCode | None = None
    details: str = "injected by the test proxy"
    after: int = 0  # stream responses forwarded before the status (streams only)
    delay: float = 0.0
    times: int | None = None  # None: every call
    end_after: int | None = None  # streams: end the stream (status OK) after this many


class GrpcProxy:
    """A plaintext gRPC proxy to one etcd endpoint, with per-method rules."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.rules: dict[str, Rule] = {}
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()
        self._channel = grpc.insecure_channel(upstream)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        self._server.add_generic_rpc_handlers([_Handler(self)])
        self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        self._server.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def inject(self, method: str, rule: Rule) -> None:
        """``method`` is the service/method, e.g. ``KV/Range``."""
        self.rules[_full(method)] = rule

    def clear(self) -> None:
        self.rules.clear()

    def close(self) -> None:
        self._server.stop(grace=0)
        self._channel.close()

    def rule(self, method: str) -> Rule | None:
        with self._lock:
            self.calls[method] = self.calls.get(method, 0) + 1
            rule = self.rules.get(method)
            if rule is None:
                return None
            if rule.times is not None:
                if rule.times <= 0:
                    return None
                rule.times -= 1
            return rule


def _full(method: str) -> str:
    service, name = method.split("/")
    return f"/etcdserverpb.{service}/{name}"


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, proxy: GrpcProxy) -> None:
        self.proxy = proxy

    def service(self, details: Any) -> Any:
        method = details.method
        metadata = tuple(details.invocation_metadata or ())
        if method in STREAMS:
            return grpc.stream_stream_rpc_method_handler(self._stream(method, metadata))
        return grpc.unary_unary_rpc_method_handler(self._unary(method, metadata))

    def _unary(self, method: str, metadata: tuple[Any, ...]) -> Any:
        upstream = self.proxy._channel.unary_unary(method)

        def handle(request: bytes, context: Any) -> bytes:
            rule = self.proxy.rule(method)
            if rule is not None and rule.delay:
                time.sleep(rule.delay)
            if rule is not None and rule.code is not None:
                context.abort(rule.code, rule.details)
            try:
                remaining = context.time_remaining()
                return upstream(request, timeout=remaining, metadata=metadata)  # type: ignore[no-any-return]
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details() or "")
            raise AssertionError("unreachable")

        return handle

    def _stream(self, method: str, metadata: tuple[Any, ...]) -> Any:
        upstream = self.proxy._channel.stream_stream(method)

        def handle(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
            rule = self.proxy.rule(method)
            if rule is not None and rule.code is not None and rule.after == 0:
                if rule.delay:
                    time.sleep(rule.delay)
                context.abort(rule.code, rule.details)
            call = upstream(requests, metadata=metadata)
            context.add_callback(call.cancel)
            sent = 0
            try:
                for response in call:
                    if rule is not None and rule.delay and sent == 0:
                        time.sleep(rule.delay)
                    yield response
                    sent += 1
                    if rule is not None and rule.end_after is not None and sent >= rule.end_after:
                        call.cancel()
                        return
                    if rule is not None and rule.code is not None and sent >= rule.after:
                        call.cancel()
                        context.abort(rule.code, rule.details)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    context.abort(exc.code(), exc.details() or "")

        return handle
