"""The etcd client (sakeystate/etcd.py) against a real etcd 3.5, faults injected by proxies.

- Only our own error types leave the module: every gRPC status code, injected by a
  loopback gRPC proxy in front of a real etcd, at every call site (range, get,
  transaction, lease grant / keepalive / revoke, leased put, authenticate, watch
  start and watch stream), ends in an EtcdError naming the operation and endpoint.
- Two clusters behind one configuration are refused with both endpoints and IDs.
- Each "suspected" item of issue 17: the client's deadline is per call, not fixed at
  creation; closing a watch never blocks behind a stalled stream; a lease answered
  with TTL 0 or not refreshed for its TTL is reported lost, and a waiter's lease is
  refreshed from the start; a stream that ends is an error, never an event; the
  bundle's directory fsync and the marker's removal raise BundleError; a state-file
  edit whose new etcd settings fail is not lost.
- The reload lock is fair (arrival order), names holder and queue position when it
  gives up, keeps per-host waiter keys, reports its holder and wait time; a held lock
  whose lease is lost says so. The leased key lives while its process does, comes
  back after a loss and writes nothing while idle.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from sakeystate import bundle
from sakeystate.errors import BundleError, EtcdError
from sakeystate.etcd import (
    ClusterMismatch,
    EtcdStore,
    Lease,
    PrefixWatch,
    ReloadLock,
    lock_queue,
)
from sakeystate.model import Guard, Put
from sakeystate.state import BundleConfig, EtcdConfig, load_state
from sakeystate.watch import Options, Watcher

from etcd_cluster import Cluster, require_etcd
from etcd_proxy import GrpcProxy, Rule, TcpProxy
from support import private_key, run_cli, state_data, write_state
from watch_support import wait_for

PASSWORD = "client-test-password"
CODES = [c for c in grpc.StatusCode if c != grpc.StatusCode.OK]
# Revoking a lease etcd no longer has is what revoking is for: not an error.
NOT_AN_ERROR = {("lease-revoke", grpc.StatusCode.NOT_FOUND)}


@pytest.fixture(scope="module")
def etcd() -> Iterator[Cluster]:
    """One member, auth enabled (user ``sakeystate`` may do anything under /c/)."""
    directory = Path(tempfile.mkdtemp(prefix="sakeystate-client-"))
    cluster = Cluster(directory, require_etcd("3.5"), size=1, extra_args=["--auth-token-ttl", "2"])
    try:
        cluster.start()
        cluster.enable_auth()
        cluster.add_user("sakeystate", PASSWORD, [("readwrite", "/c/", True)])
        (directory / "password").write_text(PASSWORD)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


def config(cluster: Cluster, *endpoints: str, timeout: float = 2.0, **kw: Any) -> EtcdConfig:
    return EtcdConfig(
        endpoints=endpoints or tuple(cluster.endpoints()),
        prefix="/c/keys/",
        status_prefix="/c/status/",
        reload_lock="/c/lock",
        timeout=timeout,
        username="sakeystate",
        password_file=str(cluster.directory / "password"),
        **kw,
    )


@pytest.fixture
def proxy(etcd: Cluster) -> Iterator[GrpcProxy]:
    server = GrpcProxy(etcd.members[0].direct_url.removeprefix("http://"))
    try:
        yield server
    finally:
        server.close()


# --- only EtcdError leaves the module -----------------------------------------------------


def _watch_start(store: EtcdStore) -> None:
    revision = store.read("/c/keys/").revision
    PrefixWatch(store, ["/c/keys/"], revision + 1).close()


def _watch_stream(store: EtcdStore) -> None:
    revision = store.read("/c/keys/").revision
    with PrefixWatch(store, ["/c/keys/"], revision + 1) as watch:
        watch.wait(5)


def _lease(store: EtcdStore) -> None:
    lease = store.grant_lease(5, "test")
    store.keepalive(lease, "test")
    store.put_leased("/c/keys/leased", b"x", lease, "test")
    store.revoke_lease(lease, "test")


SITES: dict[str, tuple[str, Callable[[EtcdStore], object]]] = {
    "range": ("KV/Range", lambda s: s.read("/c/keys/")),
    "get": ("KV/Range", lambda s: s.get("/c/keys/one")),
    "txn": ("KV/Txn", lambda s: s.transaction([Guard("/c/keys/t", 0)], [Put("/c/keys/t", b"")])),
    "lease-grant": ("Lease/LeaseGrant", _lease),
    "lease-keepalive": ("Lease/LeaseKeepAlive", _lease),
    "lease-put": ("KV/Put", _lease),
    "lease-revoke": ("Lease/LeaseRevoke", _lease),
    "authenticate": ("Auth/Authenticate", lambda s: s.read("/c/keys/")),
    "watch-start": ("Watch/Watch", _watch_start),
}


@pytest.mark.parametrize("site", sorted(SITES))
def test_every_status_code_at_every_call_site_is_an_etcd_error(
    etcd: Cluster, proxy: GrpcProxy, site: str
) -> None:
    method, operation = SITES[site]
    escaped = []
    for code in CODES:
        proxy.inject(method, Rule(code, f"injected {code.name}"))
        with EtcdStore(config(etcd, proxy.url, timeout=0.5)) as store:
            try:
                operation(store)
            except EtcdError as exc:
                assert proxy.url in str(exc), (code, str(exc))
            except BaseException as exc:  # the contract under test
                escaped.append(f"{code.name}: {type(exc).__name__}: {exc}")
            else:
                if (site, code) not in NOT_AN_ERROR:
                    escaped.append(f"{code.name}: no error at all")
        proxy.clear()
    assert escaped == []


def test_a_watch_stream_failing_after_it_started_is_an_etcd_error(
    etcd: Cluster, proxy: GrpcProxy
) -> None:
    escaped = []
    for code in CODES:
        # The stream fails after its "created" answer, the next time etcd says anything.
        proxy.inject("Watch/Watch", Rule(code, f"injected {code.name}", after=2))
        with EtcdStore(config(etcd, proxy.url, timeout=2)) as store:
            revision = store.read("/c/keys/").revision
            with PrefixWatch(store, ["/c/keys/"], revision + 1) as watch:
                etcd.put("/c/keys/w", code.name)
                try:
                    watch.wait(0.5)  # the event itself
                    watch.wait(10)
                except EtcdError as exc:
                    assert proxy.url in str(exc) and code.name in str(exc), str(exc)
                except BaseException as exc:
                    escaped.append(f"{code.name}: {type(exc).__name__}: {exc}")
                else:
                    escaped.append(f"{code.name}: no error")
        proxy.clear()
    assert escaped == []


def test_a_watch_stream_that_just_ends_is_an_error_never_an_event(
    etcd: Cluster, proxy: GrpcProxy
) -> None:
    """Suspected in issue 17: the library called the callback with None when the stream
    ended; here the end of a stream is an EtcdError naming the endpoint."""
    proxy.inject("Watch/Watch", Rule(end_after=1))  # "created", then the stream ends (OK)
    with EtcdStore(config(etcd, proxy.url)) as store:
        revision = store.read("/c/keys/").revision
        with (
            PrefixWatch(store, ["/c/keys/"], revision + 1) as watch,
            pytest.raises(EtcdError, match="ended the watch stream"),
        ):
            watch.wait(10)


def test_a_watch_reports_changes_and_a_compaction(etcd: Cluster) -> None:
    with EtcdStore(config(etcd)) as store:
        revision = store.read("/c/keys/").revision
        etcd.put("/c/keys/one", "1")
        etcd.put("/c/keys/two", "2")
        with PrefixWatch(store, ["/c/keys/"], revision + 1) as watch:
            newest = watch.wait(5)
            assert newest is not None and newest >= revision + 2
            assert watch.wait(0.3) is None
        etcd.compact()
        with (
            pytest.raises(EtcdError, match="compacted"),
            PrefixWatch(store, ["/c/keys/"], revision + 1) as watch,
        ):
            watch.wait(5)


# --- two clusters ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def foreign() -> Iterator[Cluster]:
    directory = Path(tempfile.mkdtemp(prefix="sakeystate-foreign-"))
    cluster = Cluster(directory, require_etcd("3.5"), size=1)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _cluster_id(url: str) -> str:
    import json
    import subprocess

    from etcd_server import etcdctl_binary

    out = subprocess.run(
        [etcdctl_binary(), "--endpoints", url, "endpoint", "status", "-w", "json"],
        capture_output=True,
        check=True,
        env={**os.environ, "ETCDCTL_API": "3"},
    ).stdout
    return format(json.loads(out)[0]["Status"]["header"]["cluster_id"], "x")


def test_endpoints_of_two_clusters_are_refused_naming_both(
    foreign: Cluster, tmp_path: Path
) -> None:
    other = Cluster(tmp_path / "second", require_etcd("3.5"), size=1).start()
    try:
        a, b = foreign.members[0].url, other.members[0].url
        ids = _cluster_id(a), _cluster_id(b)
        assert ids[0] != ids[1]
        plain = EtcdConfig(endpoints=(a, b), prefix="/p/", timeout=2)
        # A long-lived session asks every endpoint when it starts its watch.
        with EtcdStore(plain) as store:
            revision = store.read("/p/").revision
            with pytest.raises(ClusterMismatch) as caught:
                PrefixWatch(store, ["/p/"], revision + 1)
        message = str(caught.value)
        assert a in message and b in message and ids[0] in message and ids[1] in message
        # A one-shot run compares the headers as they come: failing over to the other
        # cluster is refused before anything is read from it or written to it.
        with EtcdStore(plain) as store:
            store.read("/p/")
            foreign.members[0].pause()
            try:
                with pytest.raises(ClusterMismatch, match="two different clusters"):
                    store.transaction([Guard("/p/x", 0)], [Put("/p/x", b"x")])
            finally:
                foreign.members[0].resume()
        assert other.dump("/p/") == {}
        # `wait` (a watch) exits 1 with the same message.
        data = state_data(a, "/p/", tmp_path / "b.pem", [], etcd={"endpoints": [a, b]})
        data["fleet"] = ["ctrl1.example.org"]
        state = write_state(tmp_path / "state.yaml", data)
        result = run_cli("wait", "--state", str(state), "--kid", "A" * 43, "--timeout", "5s")
        assert result.code == 1 and "two different clusters" in result.err, result.err
        assert "Traceback" not in result.err
    finally:
        other.stop()


# --- the suspected items of issue 17 ----------------------------------------------------


def test_the_deadline_is_per_call_not_fixed_when_the_connection_was_made(
    etcd: Cluster, proxy: GrpcProxy
) -> None:
    """python3-etcd3's client kept the time left when it was created as the timeout of
    every later watch. Here the connection is made by a call with 0.3 s to live; a
    watch whose "created" answer comes 1 s late still starts, within its own deadline."""
    from etcd3 import etcdrpc

    with EtcdStore(config(etcd, proxy.url, timeout=4.0)) as store:
        request = etcdrpc.RangeRequest(key=b"/c/keys/none")
        with contextlib.suppress(EtcdError):  # in time or not: the connection is made
            store._guarded(
                "a short call", lambda c, d: store._rpc(c, "kv", "Range", request, d), timeout=0.3
            )
        revision = store.read("/c/keys/").revision
        proxy.inject("Watch/Watch", Rule(delay=1.0))
        with PrefixWatch(store, ["/c/keys/"], revision + 1) as watch:
            etcd.put("/c/keys/late", "x")
            assert watch.wait(10) is not None


def test_closing_a_watch_never_blocks_behind_a_stalled_stream(etcd: Cluster) -> None:
    stalling = TcpProxy(etcd.members[0].client_port)
    try:
        with EtcdStore(config(etcd, stalling.url)) as store:
            revision = store.read("/c/keys/").revision
            watch = PrefixWatch(store, ["/c/keys/"], revision + 1)
            stalling.stall()
            closer = threading.Thread(target=watch.close, daemon=True)
            closer.start()
            closer.join(timeout=10)
            assert not closer.is_alive(), "close() blocked behind the stalled stream"
    finally:
        stalling.close()


def test_a_stalled_watch_stream_is_resumed_on_another_member_without_losing_events(
    etcd: Cluster,
) -> None:
    stalling = TcpProxy(etcd.members[0].client_port)
    healthy = TcpProxy(etcd.members[0].client_port)
    try:
        with EtcdStore(config(etcd, stalling.url, healthy.url, timeout=2)) as store:
            revision = store.read("/c/keys/").revision
            watch = PrefixWatch(store, ["/c/keys/"], revision + 1)
            assert watch.endpoint == stalling.url
            stalling.stall()
            etcd.put("/c/keys/during-the-stall", "x")
            newest = watch.wait(30)
            assert newest is not None and newest > revision
            assert watch.endpoint == healthy.url
            assert watch.wait(0.5) is None  # the event came once, not again
            watch.close()
    finally:
        stalling.close()
        healthy.close()


def test_a_lease_answered_with_ttl_0_is_lost(etcd: Cluster) -> None:
    lease = Lease(config(etcd), 3, "test")
    try:
        etcd.ctl("lease", "revoke", format(lease.id, "x"))
        assert lease.lost.wait(10)
    finally:
        lease.revoke()


def test_a_lease_that_cannot_be_refreshed_for_its_ttl_is_lost(etcd: Cluster) -> None:
    stalling = TcpProxy(etcd.members[0].client_port)
    try:
        lease = Lease(config(etcd, stalling.url), 3, "test")
        time.sleep(1.5)
        assert not lease.lost.is_set()
        stalling.stall()
        assert lease.lost.wait(15)
        lease.revoke()
    finally:
        stalling.close()


def test_a_waiters_lease_is_kept_alive_from_the_start_through_a_long_wait(
    etcd: Cluster,
) -> None:
    """The first refresh is a third of the TTL after the grant, whatever the waiter does:
    a waiter with a 3 s lease queued behind a holder for 10 s keeps its place."""
    with EtcdStore(config(etcd)) as store, EtcdStore(config(etcd)) as other:
        holder = ReloadLock(store, "/c/lock-long", "ctrl1.example.org pid 1", ttl=3)
        holder.acquire(5)
        waiter = ReloadLock(other, "/c/lock-long", "ctrl2.example.org pid 2", ttl=3)
        done = threading.Event()

        def take() -> None:
            waiter.acquire(60)
            done.set()

        thread = threading.Thread(target=take, daemon=True)
        thread.start()
        wait_for("the waiter's key", lambda: len(lock_queue(store, "/c/lock-long")) == 2)
        first_key = lock_queue(store, "/c/lock-long")[1].key
        time.sleep(10)
        assert not waiter.lost.is_set() and not holder.lost.is_set()
        assert [w.key for w in lock_queue(store, "/c/lock-long")][1] == first_key
        holder.release()
        assert done.wait(20)
        assert waiter.held()
        assert [w.key for w in lock_queue(store, "/c/lock-long")] == [first_key]
        waiter.release()
        thread.join(5)


def test_bundle_directory_fsync_and_marker_removal_raise_bundle_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Suspected in issue 17: a failing directory fsync raised a bare OSError, which
    `watch` reported as an "internal error". The failure is the kernel's word (EIO):
    os.fsync is made to fail on directories only."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    config_ = BundleConfig(path=str(tmp_path / "sa.pem"))
    bundle.mark_reload_pending(config_, "test")
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(BundleError, match="cannot sync its directory"):
        bundle.write(config_, b"# bundle\n")
    with pytest.raises(BundleError, match=r"removed .*reload-pending, but cannot sync"):
        bundle.clear_reload_pending(config_)


def test_a_state_edit_whose_etcd_settings_fail_is_not_lost(etcd: Cluster, tmp_path: Path) -> None:
    """Suspected in issue 17: a store error right after a state-file edit lost the edit.
    Creating a store never fails now; the new settings' error comes from the pass, and
    the pass after the password file appears uses the edited state, with no new edit."""
    key = private_key("ec256", 301)
    from support import entry_value, kid

    etcd.put("/c/keys/" + kid(key), entry_value(key, "ctrl1.example.org"))
    auth = {"username": "sakeystate", "password_file": str(etcd.directory / "password")}
    base = {"endpoints": etcd.endpoints(), "prefix": "/c/keys/", "status_prefix": "/c/status/"}
    data = state_data(
        etcd.endpoints()[0], "/c/keys/", tmp_path / "sa.pem", [], etcd={**base, "auth": auth}
    )
    data["etcd"]["reload_lock"] = None
    state = write_state(tmp_path / "state.yaml", data)
    watcher = Watcher(
        Options(str(state), "ctrl1.example.org", 0.0, 600.0),
        load_state(str(state), "ctrl1.example.org"),
        None,
        lambda: datetime.now(UTC),
    )
    err = io.StringIO()
    late_password = tmp_path / "late-password"
    with redirect_stderr(err):
        watcher._pass()
        assert not (tmp_path / "sa.pem").exists() or (tmp_path / "sa.pem").read_text() == ""
        data["trusted"] = [{"fingerprint": kid(key), "host": "ctrl1.example.org"}]
        data["etcd"]["auth"] = {**auth, "password_file": str(late_password)}
        write_state(state, data)
        time.sleep(0.05)
        watcher._check_state()
        watcher._pass()
        assert "late-password" in err.getvalue()
        late_password.write_text(PASSWORD)
        watcher._pass()
    watcher._drop_watch()
    watcher.store.close()
    assert "internal error" not in err.getvalue()
    assert kid(key) in (tmp_path / "sa.pem").read_text()


# --- the reload lock ------------------------------------------------------------------------


def test_waiters_take_the_lock_in_arrival_order(etcd: Cluster) -> None:
    key = "/c/lock-fair"
    stores = [EtcdStore(config(etcd)) for _ in range(4)]
    order: list[str] = []
    try:
        first = ReloadLock(stores[0], key, "ctrl0.example.org pid 10")
        first.acquire(5)
        threads = []
        for index in (1, 2, 3):
            lock = ReloadLock(stores[index], key, f"ctrl{index}.example.org pid {index}")

            def take(lock: ReloadLock = lock) -> None:
                lock.acquire(60)
                order.append(lock.host)
                time.sleep(0.3)
                lock.release()

            thread = threading.Thread(target=take, daemon=True)
            thread.start()
            threads.append(thread)
            wait_for(
                "the waiter to queue", lambda n=index: len(lock_queue(stores[0], key)) == n + 1
            )
        queue = lock_queue(stores[0], key)
        assert [w.host for w in queue] == [f"ctrl{i}.example.org" for i in range(4)]
        assert all(w.key == f"{key}/{w.host}/{w.lease:x}" for w in queue)
        assert first.current_holder() == queue[0]
        assert queue[0].since is not None
        first.release()
        for thread in threads:
            thread.join(60)
        assert order == ["ctrl1.example.org", "ctrl2.example.org", "ctrl3.example.org"]
        assert lock_queue(stores[0], key) == []
    finally:
        for store in stores:
            store.close()


def test_a_waiter_that_gives_up_names_the_holder_and_its_place(etcd: Cluster) -> None:
    key = "/c/lock-giveup"
    with (
        EtcdStore(config(etcd)) as a,
        EtcdStore(config(etcd)) as b,
        EtcdStore(config(etcd)) as c,
    ):
        holder = ReloadLock(a, key, "ctrl1.example.org pid 4242")
        holder.acquire(5)
        second = ReloadLock(b, key, "ctrl2.example.org pid 2")
        thread = threading.Thread(target=lambda: second.acquire(30), daemon=True)
        thread.start()
        wait_for("the second waiter", lambda: len(lock_queue(a, key)) == 2)
        third = ReloadLock(c, key, "ctrl3.example.org pid 3")
        with pytest.raises(EtcdError) as caught:
            third.acquire(1)
        message = str(caught.value)
        assert "'ctrl1.example.org pid 4242'" in message
        assert "number 3 in the queue (2 ahead of it)" in message and "gave up after 1s" in message
        assert third.waited is not None and third.waited >= 1
        assert [w.host for w in lock_queue(a, key)] == ["ctrl1.example.org", "ctrl2.example.org"]
        holder.release()
        thread.join(30)
        assert second.held()
        second.release()


def test_a_holder_whose_lease_is_lost_is_told(etcd: Cluster) -> None:
    with EtcdStore(config(etcd)) as store:
        lock = ReloadLock(store, "/c/lock-lost", "ctrl1.example.org pid 1", ttl=3)
        lock.acquire(5)
        assert lock.held() and not lock.lost.is_set()
        etcd.ctl("lease", "revoke", format(lock_queue(store, "/c/lock-lost")[0].lease, "x"))
        assert lock.lost.wait(10)
        assert not lock.held()
        lock.release()


def test_a_sakeystate_0_2_holder_at_the_exact_key_is_waited_for(etcd: Cluster) -> None:
    with EtcdStore(config(etcd)) as store:
        lease = store.grant_lease(30, "test")
        store.put_leased("/c/lock-old", b"ctrl9.example.org pid 9 cafe", lease, "test")
        lock = ReloadLock(store, "/c/lock-old", "ctrl1.example.org pid 1")
        with pytest.raises(EtcdError, match=r"held by 'ctrl9\.example\.org pid 9 cafe'"):
            lock.acquire(1)
        store.revoke_lease(lease, "test")
        lock.acquire(5)
        assert lock.held()
        lock.release()


# --- auth tokens ----------------------------------------------------------------------------


def test_a_session_idle_past_the_token_ttl_renews_its_token(
    etcd: Cluster, proxy: GrpcProxy
) -> None:
    with EtcdStore(config(etcd, proxy.url)) as store:
        store.read("/c/keys/")
        assert proxy.calls["/etcdserverpb.Auth/Authenticate"] == 1
        time.sleep(4)  # twice etcd's --auth-token-ttl of 2 s
        store.read("/c/keys/")
        assert proxy.calls["/etcdserverpb.Auth/Authenticate"] == 2


def test_a_token_older_than_its_renewal_age_is_replaced_before_the_call(
    etcd: Cluster, proxy: GrpcProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sakeystate import etcd as etcd_module

    monkeypatch.setattr(etcd_module, "TOKEN_IDLE", 1.0)
    with EtcdStore(config(etcd, proxy.url)) as store:
        store.read("/c/keys/")
        time.sleep(1.2)
        store.read("/c/keys/")
        # Renewed on schedule: no call was refused for an invalid token.
        assert proxy.calls["/etcdserverpb.Auth/Authenticate"] == 2
        assert proxy.calls["/etcdserverpb.KV/Range"] == 2


def test_a_wrong_password_names_the_user_and_endpoint(etcd: Cluster, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-it")
    with (
        EtcdStore(replace(config(etcd), password_file=str(wrong))) as store,
        pytest.raises(EtcdError) as caught,
    ):
        store.read("/c/keys/")
    message = str(caught.value)
    assert "'sakeystate'" in message and etcd.endpoints()[0] in message
    assert "authentication failed" in message and "not-it" not in message


def test_a_jwt_token_is_renewed_before_the_expiry_it_carries(tmp_path: Path) -> None:
    """etcd's JWT tokens expire at a fixed time whatever their use: the client reads the
    ``exp`` claim and replaces the token before it, so no call is refused for it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = tmp_path / "jwt.key", tmp_path / "jwt.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    token = f"jwt,pub-key={public},priv-key={private},sign-method=ES256,ttl=3s"
    cluster = Cluster(
        tmp_path / "etcd", require_etcd("3.5"), size=1, extra_args=["--auth-token", token]
    )
    cluster.start()
    try:
        cluster.enable_auth()
        cluster.add_user("sakeystate", PASSWORD, [("readwrite", "/c/", True)])
        (cluster.directory / "password").write_text(PASSWORD)
        proxy = GrpcProxy(cluster.members[0].direct_url.removeprefix("http://"))
        try:
            with EtcdStore(config(cluster, proxy.url)) as store:
                store.read("/c/keys/")
                time.sleep(2.7)  # past the renewal point (a fifth of 3 s before exp)
                store.read("/c/keys/")
            assert proxy.calls["/etcdserverpb.Auth/Authenticate"] == 2
            assert proxy.calls["/etcdserverpb.KV/Range"] == 2  # none refused, none retried
        finally:
            proxy.close()
    finally:
        cluster.stop()
