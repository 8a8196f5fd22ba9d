"""The names a served library answers to. Every request's Host header is checked against them, so that a web
page whose name its owner points at the user's machine (DNS rebinding) cannot read the library through the
user's browser: the browser sends that page's name, which the server refuses.

A server answers to the address it listens on; on a loopback address also to localhost, 127.0.0.1 and ::1;
on every address (0.0.0.0, ::) to any IP address and to this machine's names; and to the names its user
allows (`search.py --allow_host NAME`: a reverse proxy's, a name in /etc/hosts).
"""

import ipaddress
import socket
from dataclasses import dataclass

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
EVERY_ADDRESS = ("0.0.0.0", "::", "")


def loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def is_address(name):
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def name_of(header):
    """The host name of a Host header, lower case, without its port, brackets or final dot; None if malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        name, bracket, rest = header[1:].partition("]")
        return name if bracket and (not rest or rest[1:].isdigit() and rest[0] == ":") else None
    name, colon, port = header.partition(":")
    if colon and not port.isdigit():
        return None
    return name.rstrip(".") or None


@dataclass(frozen=True)
class HostNames:
    """The names a server answers to (lower case), and whether it answers to any IP address."""

    names: frozenset
    any_address: bool = False

    def accepts(self, header):
        name = name_of(header or "")
        return name is not None and (name in self.names or self.any_address and is_address(name))

    def __str__(self):
        return ", ".join(sorted(self.names)) + (" and any IP address" if self.any_address else "")


def served_names(host, allowed=()):
    """The HostNames of a server listening on `host`, with the names its user `allowed`."""
    names = {host.lower(), *(name.lower().rstrip(".") for name in allowed)}
    every = host in EVERY_ADDRESS
    if loopback(host) or every:
        names.update(LOOPBACK_NAMES)
    if every:
        names.update({socket.gethostname().lower(), socket.getfqdn().lower()})
    names.discard("")
    return HostNames(frozenset(names), every)
