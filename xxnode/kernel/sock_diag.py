"""NETLINK_SOCK_DIAG: the only module that asks the kernel who owns the far end of a TCP socket.

The node serves the Lambda Runtime API over TCP on loopback, and each sandbox runs under its
own uid. SO_PEERCRED works only for unix sockets, so at accept() the daemon looks up the
peer's socket by its exact 4-tuple (an inet_diag exact-match request, not a dump: one
round trip, no table walk) and reads its owner uid and inode.

The uid is the socket's sk_uid: the fsuid of whoever called socket(2), fixed at creation.
A socket that no process holds any more (orphaned after close, TIME_WAIT, a half-open
request) reports uid 0 and inode 0; we answer None for those, never "root".

If the kernel lacks tcp_diag the kernel answers ENOENT for every request, so every lookup
is None and the daemon refuses every peer: it fails closed.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 2
NLMSG_DONE = 3
TCP_LISTEN = 10
TCPF_ALL = 0xFFFFFFFF
INET_DIAG_NOCOOKIE = 0xFFFFFFFF  # both cookie words: do not check the socket cookie

# struct nlmsghdr { __u32 nlmsg_len; __u16 nlmsg_type; __u16 nlmsg_flags;
#                   __u32 nlmsg_seq; __u32 nlmsg_pid; };
_NLMSGHDR = struct.Struct("=IHHII")
# struct inet_diag_sockid { __be16 idiag_sport; __be16 idiag_dport; __be32 idiag_src[4];
#                           __be32 idiag_dst[4]; __u32 idiag_if; __u32 idiag_cookie[2]; };
_SOCKID = struct.Struct("!HH16s16s")  # then idiag_if and the cookie, host order
_SOCKID_TAIL = struct.Struct("=III")
# struct inet_diag_req_v2 { __u8 sdiag_family; __u8 sdiag_protocol; __u8 idiag_ext; __u8 pad;
#                           __u32 idiag_states; struct inet_diag_sockid id; };
_REQ_HEAD = struct.Struct("=BBBBI")
# struct inet_diag_msg { __u8 idiag_family; __u8 idiag_state; __u8 idiag_timer;
#                        __u8 idiag_retrans; struct inet_diag_sockid id; __u32 idiag_expires;
#                        __u32 idiag_rqueue; __u32 idiag_wqueue; __u32 idiag_uid;
#                        __u32 idiag_inode; };
_MSG_HEAD = struct.Struct("=BBBB")
_MSG_TAIL = struct.Struct("=IIIII")
_SOCKID_LEN = _SOCKID.size + _SOCKID_TAIL.size  # 48
_MSG_LEN = _MSG_HEAD.size + _SOCKID_LEN + _MSG_TAIL.size  # 72
# struct nlmsgerr { int error; struct nlmsghdr msg; ... };  error is -errno, 0 for an ACK
_NLMSGERR = struct.Struct("=i")

_RECV_TIMEOUT_S = 1.0  # the kernel queues the answer before sendto returns; this is a backstop
_V4MAPPED = bytes(10) + b"\xff\xff"
_STALE = object()  # a reply to some earlier request


class SockDiagError(OSError):
    """The kernel refused or garbled a sock_diag request (not: "no such socket")."""


def _v4(field: bytes) -> bytes:
    """A v4-mapped idiag_src/dst as the IPv4 layout: a dual-stack socket connected to an
    IPv4 address is found by an AF_INET request but reports its addresses in IPv6 form."""
    return field[12:] + bytes(12) if field.startswith(_V4MAPPED) else field


def _addr(host: str) -> tuple[int, bytes]:
    """(family, 16-byte idiag_src/dst field). An IPv4 address fills the first word only;
    a v4-mapped IPv6 address (a dual-stack listener's view of an IPv4 peer) is IPv4."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.version == 4:
        return socket.AF_INET, ip.packed + bytes(12)
    return socket.AF_INET6, ip.packed


class PeerLookup:
    """One NETLINK_SOCK_DIAG socket, kept open: the daemon asks once per accepted connection.
    Not for concurrent use from several threads (one request in flight at a time)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
        self._sock.settimeout(_RECV_TIMEOUT_S)
        self._seq = itertools.count(1)

    def owner(self, local: tuple, peer: tuple) -> tuple[int, int] | None:
        """(uid, inode) of the TCP socket at `peer` connected to our `local`, or None if no
        process holds such a socket. Both are getsockname()/getpeername() tuples."""
        fam, peer_ip = _addr(peer[0])
        fam_l, local_ip = _addr(local[0])
        if fam != fam_l:
            return None  # no TCP connection joins an IPv4 and an IPv6 address
        # The PEER socket's view: its source is the peer, its destination is us.
        sockid = _SOCKID.pack(peer[1], local[1], peer_ip, local_ip) + _SOCKID_TAIL.pack(
            0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE
        )
        body = _REQ_HEAD.pack(fam, socket.IPPROTO_TCP, 0, 0, TCPF_ALL) + sockid
        seq = next(self._seq) & 0xFFFFFFFF
        hdr = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0)
        try:
            self._sock.sendto(hdr + body, (0, 0))
            while True:
                reply = self._sock.recv(8192)
                found = self._parse(reply, seq, (peer[1], local[1], peer_ip, local_ip))
                if found is not _STALE:
                    return found
        except TimeoutError:
            raise SockDiagError(errno.ETIMEDOUT, "sock_diag: no answer from the kernel") from None

    @staticmethod
    def _parse(reply: bytes, seq: int, want: tuple[int, int, bytes, bytes]):
        off = 0
        while off + _NLMSGHDR.size <= len(reply):
            length, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(reply, off)
            if length < _NLMSGHDR.size or off + length > len(reply):
                raise SockDiagError(errno.EPROTO, "sock_diag: truncated netlink message")
            payload = off + _NLMSGHDR.size
            off += (length + 3) & ~3  # NLMSG_ALIGN
            if mseq != seq:
                continue  # an answer to an earlier request that timed out
            if mtype == NLMSG_ERROR:
                (err,) = _NLMSGERR.unpack_from(reply, payload)
                if err in (0, -errno.ENOENT):
                    return None
                raise SockDiagError(-err, f"sock_diag: {errno.errorcode.get(-err, -err)}")
            if mtype == NLMSG_DONE:
                return None
            if mtype != SOCK_DIAG_BY_FAMILY or length - _NLMSGHDR.size < _MSG_LEN:
                raise SockDiagError(errno.EPROTO, f"sock_diag: unexpected message type {mtype}")
            _fam, state, _timer, _retrans = _MSG_HEAD.unpack_from(reply, payload)
            sport, dport, src, dst = _SOCKID.unpack_from(reply, payload + _MSG_HEAD.size)
            _exp, _rq, _wq, uid, inode = _MSG_TAIL.unpack_from(
                reply, payload + _MSG_HEAD.size + _SOCKID_LEN
            )
            # The kernel's lookup falls back to a listener on the peer's port; only the exact
            # 4-tuple is our connection. inode 0: nobody holds it (orphan, TIME_WAIT).
            if (sport, dport, _v4(src), _v4(dst)) != want or state == TCP_LISTEN or inode == 0:
                return None
            return uid, inode
        return _STALE

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> PeerLookup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def peer_owner(local: tuple, peer: tuple) -> tuple[int, int] | None:
    """One-off PeerLookup.owner (opens and closes a netlink socket)."""
    with PeerLookup() as lookup:
        return lookup.owner(local, peer)
