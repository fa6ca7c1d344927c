"""A network lab for the cluster tests: each "host" its own network namespace and IP.

::

    netns <tag>-hub: bridge br0
      |- v0 ==veth== eth0 in netns <tag>-<host0>   10.77.0.10/24   [netem on eth0]
      |- v1 ==veth== eth0 in netns <tag>-<host1>   10.77.0.11/24   [netem on eth0]
      ...

Everything is made with pyroute2 over netlink (no ``ip`` shell-outs). netem, when asked
for, sits on each host's egress (its ``eth0``), so every datagram a host sends crosses
exactly one lossy, delayed link: loss, delay and jitter per hop as a real network
would have them (jitter reorders: netem releases packets by their own send time).

Processes run inside a host with :meth:`Host.popen`: the child calls ``setns`` on the
host's namespace between fork and exec (``preexec_fn``), rather than going through
``ip netns exec``. The child is then exactly the command (its pid is what a test kills),
it keeps the parent's mount namespace (``ip netns exec`` unshares one and remounts
``/sys``), and the lab needs nothing but pyroute2 -- the same call puts the test's own
client socket into a namespace (:meth:`Host.entered`), which ``ip netns exec`` cannot do.

:func:`netlab` is a context manager that tears everything down even when the body
raises: processes still in a lab namespace are killed, the veths and the bridge deleted,
the namespaces removed -- and it checks that nothing is left.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import ipaddress
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

# find_library may run ldconfig: never in a forked child, so once, here
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
TC_H_ROOT = 0xFFFFFFFF
SUBNET = ipaddress.ip_network("10.77.0.0/24")
FIRST_HOST = 10  # hosts get .10, .11, ...
_seq = 0


class LabError(Exception):
    """The lab could not be built (or torn down) as asked; the message says why."""


@dataclass(frozen=True)
class Netem:
    """netem on a host's egress: ``loss`` and ``duplicate`` in percent, times in ms."""

    loss: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    duplicate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("loss", "duplicate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 100.0:
                raise LabError(f"netem {name}: a percentage in [0, 100], got {v!r}")
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise LabError("netem delay_ms and jitter_ms must be >= 0")
        if self.jitter_ms > self.delay_ms:
            raise LabError("netem jitter_ms must not exceed delay_ms")

    def tc_args(self) -> dict:
        return {
            "loss": self.loss,
            "delay": int(self.delay_ms * 1000),  # pyroute2 takes microseconds
            "jitter": int(self.jitter_ms * 1000),
            "duplicate": self.duplicate,
        }


@dataclass(frozen=True)
class Host:
    name: str
    ns: str  # the network namespace (a name under /run/netns)
    ip: str
    ifname: str = "eth0"

    def enter(self) -> None:
        """Move the calling thread into this host's namespace (a ``preexec_fn``)."""
        # flags=0: never create a missing namespace; libc resolved before any fork
        netns.setns(self.ns, flags=0, libc=_LIBC)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """This thread inside the host for the block; sockets made there stay there."""
        back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            self.enter()
            try:
                yield
            finally:
                netns.setns(back, flags=0, libc=_LIBC)
        finally:
            os.close(back)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(argv, preexec_fn=self.enter, **kw)


class Lab:
    def __init__(self, hosts: list[str], netem: Netem | None = None) -> None:
        global _seq
        if len(set(hosts)) != len(hosts) or not hosts:
            raise LabError(f"host names must be distinct and at least one: {hosts!r}")
        if len(hosts) > SUBNET.num_addresses - FIRST_HOST - 1:
            raise LabError(f"{len(hosts)} hosts do not fit in {SUBNET}")
        _seq += 1
        self.tag = f"xxlab{os.getpid()}-{_seq}"  # concurrent labs never share a name
        self.hub = f"{self.tag}-hub"
        self.netem = netem
        self.hosts: dict[str, Host] = {}
        for i, name in enumerate(hosts):
            if not name.isalnum():
                raise LabError(f"host name {name!r}: letters and digits only")
            ip = str(SUBNET.network_address + FIRST_HOST + i)
            self.hosts[name] = Host(name, f"{self.tag}-{name}", ip)
        self._made: list[str] = []  # namespaces created, for teardown

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    # building -------------------------------------------------------------------------
    def build(self) -> None:
        for ns in [self.hub, *(h.ns for h in self.hosts.values())]:
            netns.create(ns)
            self._made.append(ns)
        for h in self.hosts.values():
            # IPv4 only: no router solicitations or MLD reports of its own, so what netem
            # counts on a link is the traffic of the processes on it (and ARP)
            with h.entered():  # /proc/sys/net is that of the opener's namespace
                for conf in ("default", "all"):
                    _sysctl(f"net/ipv6/conf/{conf}/disable_ipv6", "1")
        with IPRoute(netns=self.hub, flags=0) as hub:
            hub.link("add", ifname="br0", kind="bridge")  # STP off: ports forward at once
            br = hub.link_lookup(ifname="br0")[0]
            for i, h in enumerate(self.hosts.values()):
                port = f"v{i}"
                hub.link(
                    "add", ifname=port, kind="veth", peer={"ifname": h.ifname, "net_ns_fd": h.ns}
                )
                hub.link("set", index=hub.link_lookup(ifname=port)[0], master=br, state="up")
            hub.link("set", index=br, state="up")
        for h in self.hosts.values():
            with IPRoute(netns=h.ns, flags=0) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                dev = ipr.link_lookup(ifname=h.ifname)[0]
                ipr.addr("add", index=dev, address=h.ip, prefixlen=SUBNET.prefixlen)
                ipr.link("set", index=dev, state="up")
                if self.netem is not None:
                    try:
                        ipr.tc("add", "netem", index=dev, handle="1:", **self.netem.tc_args())
                    except NetlinkError as e:
                        if e.code == errno.ENOENT:
                            raise LabError(
                                "this kernel has no netem qdisc (sch_netem): "
                                "load it with `modprobe sch_netem`, or run in the VM lane"
                            ) from None
                        raise

    # reading ------------------------------------------------------------------------------
    def qdisc_stats(self, name: str) -> dict[str, int]:
        """The egress qdisc of a host: packets sent and dropped (netem's losses)."""
        h = self.hosts[name]
        with IPRoute(netns=h.ns, flags=0) as ipr:
            dev = ipr.link_lookup(ifname=h.ifname)[0]
            for q in ipr.get_qdiscs(index=dev):
                if q["parent"] == TC_H_ROOT:
                    st = q.get_attr("TCA_STATS2")
                    basic = st.get_attr("TCA_STATS_BASIC")
                    queue = st.get_attr("TCA_STATS_QUEUE")
                    return {
                        "kind": q.get_attr("TCA_KIND"),
                        "packets": basic["packets"],
                        "drops": queue["drops"],
                    }
        raise LabError(f"{name}: no root qdisc on {h.ifname}")

    def netem_options(self, name: str) -> dict:
        """netem's options as the kernel reports them (a check that it took ours)."""
        h = self.hosts[name]
        with IPRoute(netns=h.ns, flags=0) as ipr:
            dev = ipr.link_lookup(ifname=h.ifname)[0]
            for q in ipr.get_qdiscs(index=dev):
                if q.get_attr("TCA_KIND") == "netem":
                    return dict(q.get_attr("TCA_OPTIONS"))
        raise LabError(f"{name}: no netem qdisc on {h.ifname}")

    def pids(self) -> dict[str, list[int]]:
        """Live processes in each lab namespace (by the namespace's inode)."""
        mine = set(self._made)
        return {ns: pids for ns, pids in netns.ns_pids().items() if ns in mine}

    # teardown -----------------------------------------------------------------------------
    def close(self) -> None:
        problems: list[str] = []
        # 1. whatever still runs inside a lab host: our children are reaped by their
        #    owners (Cluster.stop); here anything left over is killed and awaited
        for _ in range(2):
            stray = [p for pids in self.pids().values() for p in pids]
            for pid in stray:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not stray:
                break
            _wait_gone(stray, 10.0)
        # 2. the links, explicitly: a namespace outlives its name while any socket holds
        #    it, its veths with it -- deleting them here makes their end certain
        if self.hub in self._made:
            try:
                with IPRoute(netns=self.hub, flags=0) as hub:
                    for i in range(len(self.hosts)):
                        for idx in hub.link_lookup(ifname=f"v{i}"):
                            hub.link("del", index=idx)  # takes its peer eth0 with it
                    for idx in hub.link_lookup(ifname="br0"):
                        hub.link("del", index=idx)
            except (OSError, NetlinkError) as e:
                problems.append(f"deleting links in {self.hub}: {e}")
        # 3. the namespaces
        for ns in reversed(self._made):
            try:
                netns.remove(ns)
            except OSError as e:
                problems.append(f"removing netns {ns}: {e}")
        self._made.clear()
        left = [ns for ns in netns.listnetns() if ns.startswith(self.tag + "-")]
        if left:
            problems.append(f"namespaces left: {left}")
        if problems:
            raise LabError("; ".join(problems))


def _wait_gone(pids: list[int], timeout: float) -> None:
    """Until each pid has exited (a zombie counts: it holds no namespace)."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                        break
            except (FileNotFoundError, ProcessLookupError):
                break
            time.sleep(0.01)  # a foreign pid: no child-exit event to wait on


def _sysctl(key: str, value: str) -> None:
    with contextlib.suppress(FileNotFoundError):  # no IPv6 in this kernel: quiet anyway
        with open(f"/proc/sys/{key}", "w") as f:
            f.write(value)


@contextlib.contextmanager
def netlab(hosts: list[str], netem: Netem | None = None) -> Iterator[Lab]:
    """Build a lab of ``hosts``; tear it down on the way out, whatever happened inside."""
    lab = Lab(hosts, netem)
    try:
        lab.build()
        yield lab
    finally:
        lab.close()
