"""Which addresses `sdsg ingest` may connect to: public ones, plus the networks the user lists.

A URL list scraped from the Internet is untrusted, and the nodes that run ingest often reach cloud
credentials at a link-local metadata address (169.254.169.254), internal services on private networks
and the node's own loopback. So by default every address a host resolves to must be globally routable:
not unspecified, loopback, link-local, private, shared (100.64.0.0/10, carrier-grade NAT), multicast,
reserved or site-local. An IPv6 address that carries an IPv4 one is judged by what it carries as well:
IPv4-mapped ``::ffff:a.b.c.d`` (the connection goes to a.b.c.d), 6to4 ``2002:aabb:ccdd::/16``, Teredo
and NAT64 ``64:ff9b::/96``. ``ingest.allow_networks`` (CIDRs) lets listed networks through as well, for
an internal mirror or a test server. :mod:`sdsg_ray.ingest.download` applies this to the very address it
then connects to, on every redirect hop, before any connection is opened.
"""

from __future__ import annotations

import ipaddress
from typing import Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SHARED = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598; Python's is_private leaves it out
IETF_PROTOCOL = ipaddress.ip_network("192.0.0.0/24")  # RFC 6890; this Python marks only its /29 private
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the last 32 bits are an IPv4 address


def not_public(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public address (a short name), or None when it is."""
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),  # Python counts 224.0.0.0/4 and ff00::/8 as is_global
        ("shared (100.64.0.0/10)", ip.version == 4 and ip in SHARED),
        ("IETF protocol assignments (192.0.0.0/24)", ip.version == 4 and ip in IETF_PROTOCOL),
        ("site-local", ip.version == 6 and ip.is_site_local),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("not globally routable", not ip.is_global),
    )
    return next((name for name, hit in checks if hit), None)


def embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address hands traffic to (6to4, Teredo, NAT64); [] for IPv4."""
    if ip.version == 4:
        return []
    found = []
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)  # (server, client)
    if ip in NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


class AddressPolicy:
    """Public addresses, plus ``allow_networks``. ``refusal(address)`` says why not, or None."""

    def __init__(self, allow_networks: Sequence[str] = ()) -> None:
        self.allowed = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in allow_networks)

    def _listed(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self.allowed)

    def refusal(self, address: str) -> str | None:
        """None when a connection to ``address`` (an IP literal) is allowed, else the reason."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return f"{address!r} is not an IP address"
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:a.b.c.d connects to a.b.c.d: judge that one
        if self._listed(ip):
            return None
        for candidate in (ip, *embedded_ipv4(ip)):
            why = not_public(candidate)
            if why and not self._listed(candidate):
                carried = "" if candidate is ip else f" (it carries {candidate})"
                return f"{address} is {why}{carried}"
        return None
