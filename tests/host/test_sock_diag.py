"""sock_diag on this host's kernel: real loopback TCP connections from children running under
other uids, the daemon side accept()s and asks the kernel who is on the other end."""

from __future__ import annotations

import contextlib
import os
import socket
import time

import pytest

from xxnode.kernel.sock_diag import PeerLookup, peer_owner

NOBODY = 65534


@pytest.fixture
def listener():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.settimeout(10)  # a child that died before connect() fails the test, not hangs it
    yield s
    s.close()


@contextlib.contextmanager
def connected_as(uid: int, listener: socket.socket):
    """Fork a child that drops to `uid` *before* socket(2) (sk_uid is fixed at creation),
    connects, reports its socket's inode, and holds the connection until released.
    Yields (accepted socket, child's socket inode)."""
    addr = listener.getsockname()
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(report_r)
            os.close(go_w)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            c = socket.create_connection(addr)
            os.write(report_w, str(os.fstat(c.fileno()).st_ino).encode())
            os.close(report_w)
            os.read(go_r, 1)
            c.close()
            code = 0
        finally:
            os._exit(code)
    os.close(report_w)
    os.close(go_r)
    conn = None
    try:
        conn, _ = listener.accept()
        inode = int(os.read(report_r, 64))
        yield conn, inode
    finally:
        os.close(go_w)  # EOF releases the child
        os.close(report_r)
        if conn is not None:
            conn.close()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("uid", [NOBODY, 12345])
def test_peer_in_another_uid(listener, uid):
    with connected_as(uid, listener) as (conn, inode):
        assert peer_owner(conn.getsockname(), conn.getpeername()) == (uid, inode)


def test_two_sandboxes_at_once_are_told_apart(listener):
    with (
        connected_as(NOBODY, listener) as (a, a_ino),
        connected_as(12345, listener) as (b, b_ino),
        PeerLookup() as lookup,
    ):
        assert lookup.owner(a.getsockname(), a.getpeername()) == (NOBODY, a_ino)
        assert lookup.owner(b.getsockname(), b.getpeername()) == (12345, b_ino)


def test_own_process_is_root(listener):
    with socket.create_connection(listener.getsockname()) as c:
        conn, _ = listener.accept()
        with conn:
            assert peer_owner(conn.getsockname(), conn.getpeername()) == (
                0,
                os.fstat(c.fileno()).st_ino,
            )
            # the tuple read the other way round is our own accepted socket
            assert peer_owner(conn.getpeername(), conn.getsockname()) == (
                0,
                os.fstat(conn.fileno()).st_ino,
            )


def test_gone_or_unknown_is_none(listener):
    c = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    local, peer = conn.getsockname(), conn.getpeername()
    with conn, PeerLookup() as lookup:
        assert lookup.owner(local, peer) is not None
        c.close()  # the peer is now orphaned (FIN_WAIT2): the kernel says uid 0, inode 0
        assert lookup.owner(local, peer) is None
        conn.close()  # and now TIME_WAIT
        assert lookup.owner(local, peer) is None
        # no socket at all: the kernel answers ENOENT
        assert lookup.owner(("127.0.0.1", listener.getsockname()[1]), ("127.0.0.1", 1)) is None
        # the kernel's exact lookup would fall back to the listener on the "peer" port; a
        # listener is not a connection
        assert lookup.owner(("127.0.0.1", 1), listener.getsockname()) is None
        # a mixed-family tuple cannot be a connection
        assert lookup.owner(("::1", 1), ("127.0.0.1", 1)) is None


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_and_dual_stack():
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as l6:
        l6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        l6.bind(("::", 0))
        l6.listen(4)
        port = l6.getsockname()[1]
        # a native IPv6 peer
        with socket.create_connection(("::1", port)) as c:
            conn, _ = l6.accept()
            with conn:
                assert peer_owner(conn.getsockname(), conn.getpeername()) == (
                    0,
                    os.fstat(c.fileno()).st_ino,
                )
        # an IPv4 peer as a dual-stack listener sees it: ::ffff:127.0.0.1
        with socket.create_connection(("127.0.0.1", port)) as c:
            conn, _ = l6.accept()
            with conn:
                assert conn.getpeername()[0] == "::ffff:127.0.0.1"
                assert peer_owner(conn.getsockname(), conn.getpeername()) == (
                    0,
                    os.fstat(c.fileno()).st_ino,
                )


def test_lookup_cost(listener):
    """The daemon pays this once per accepted connection."""
    n = 20_000
    with connected_as(NOBODY, listener) as (conn, inode):
        local, peer = conn.getsockname(), conn.getpeername()
        with PeerLookup() as lookup:
            for _ in range(200):  # warm up
                lookup.owner(local, peer)
            t = time.perf_counter()
            for _ in range(n):
                got = lookup.owner(local, peer)
            kept = (time.perf_counter() - t) / n * 1e6
        assert got == (NOBODY, inode)
        m = 2_000
        t = time.perf_counter()
        for _ in range(m):
            peer_owner(local, peer)
        oneoff = (time.perf_counter() - t) / m * 1e6
    print(f"\nsock_diag lookup: {kept:.1f} us with PeerLookup, {oneoff:.1f} us with peer_owner")
