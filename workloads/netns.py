"""A separate host on the same machine: a network namespace joined to this one by a veth pair.

The server side of the pair is SERVER (in the caller's namespace), the client side CLIENT (in
the new one), so a load generator run there reaches the server over a real link rather than
loopback. Needs root (CAP_NET_ADMIN); the namespace and its link are removed on exit.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

SERVER, CLIENT, PREFIX = "10.231.0.1", "10.231.0.2", 24


@contextmanager
def client_namespace(name: str | None = None) -> Iterator[str]:
    """Create the namespace and link; yields the namespace's name."""
    from pyroute2 import IPRoute, NetNS, netns

    name = name or f"idlebuf-{os.getpid()}"
    host_end, client_end = f"ib{os.getpid()}h"[:15], f"ib{os.getpid()}c"[:15]
    netns.create(name)
    try:
        with IPRoute() as ip:
            ip.link("add", ifname=host_end, kind="veth", peer=client_end)
            (client_idx,) = ip.link_lookup(ifname=client_end)
            ip.link("set", index=client_idx, net_ns_fd=name)
            (host_idx,) = ip.link_lookup(ifname=host_end)
            ip.addr("add", index=host_idx, address=SERVER, prefixlen=PREFIX)
            ip.link("set", index=host_idx, state="up")
        with NetNS(name) as ns:
            (idx,) = ns.link_lookup(ifname=client_end)
            ns.addr("add", index=idx, address=CLIENT, prefixlen=PREFIX)
            ns.link("set", index=idx, state="up")
            (lo,) = ns.link_lookup(ifname="lo")
            ns.link("set", index=lo, state="up")
        yield name
    finally:
        netns.remove(name)  # takes the veth pair with it


def enter(name: str) -> None:
    """Move this process into the namespace `name` (before it opens any socket)."""
    from pyroute2 import netns

    netns.setns(name)
