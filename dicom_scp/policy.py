"""Who may send to the node, and when the node must refuse instances.

Both checks return a human-readable reason instead of a bare boolean so that every refusal
can be logged (and, for C-STORE, returned in the response's Error Comment) with its cause.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["AllowedCaller", "CallerPolicy", "DiskWatermark"]

LOGGER = logging.getLogger(__name__)

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AllowedCaller:
    """One entry of the allow list.

    Parameters
    ----------
    ae_title : str
        The calling AE title, compared without surrounding spaces (case-sensitive, as
        DICOM AE titles are).
    host : str, optional
        An IP address, a network in CIDR notation (``10.1.2.0/24``) or a host name
        (resolved once, when the policy is built). ``None`` accepts any address.
    """

    ae_title: str
    host: str | None = None


def _networks(host: str) -> list[_Network]:
    try:
        return [ipaddress.ip_network(host, strict=False)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise ValueError(f"allowed caller host {host!r} cannot be resolved: {exc}") from exc
    return [ipaddress.ip_network(str(info[4][0])) for info in infos]


def _parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address in ``text`` (IPv4-mapped IPv6 as IPv4), ``None`` if it is not one."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


class CallerPolicy:
    """The calling-AE allow list (optionally with addresses).

    With no entries every caller is accepted; :attr:`is_open` tells the node to warn
    about it at start.

    Raises
    ------
    ValueError
        If an entry's host is neither an address, a network nor a resolvable name.
    """

    def __init__(self, allowed: Iterable[AllowedCaller] = ()) -> None:
        self._rules: dict[str, list[list[_Network] | None]] = {}
        for entry in allowed:
            title = entry.ae_title.strip()
            if not title:
                raise ValueError("allowed caller with an empty AE title")
            networks = _networks(entry.host) if entry.host else None
            self._rules.setdefault(title, []).append(networks)

    @property
    def is_open(self) -> bool:
        """True when no allow list is configured (every caller is accepted)."""
        return not self._rules

    @property
    def restricts_addresses(self) -> bool:
        """True when every entry names addresses: other addresses can be refused at accept."""
        return bool(self._rules) and all(
            networks is not None for rules in self._rules.values() for networks in rules
        )

    def check_address(self, peer_address: str) -> str | None:
        """Return why no caller at ``peer_address`` can be allowed, or ``None``.

        Why: a connection from an address that no entry allows is closed at accept,
        before it costs an association thread or a slot; the AE title is checked once
        the association request arrives (:meth:`check`).
        """
        if not self.restricts_addresses:
            return None
        address = _parse_address(peer_address)
        if address is None:
            return f"unparsable address {peer_address!r}"
        for rules in self._rules.values():
            for networks in rules:
                if any(address in network for network in networks or ()):
                    return None
        return f"address {address} is not in the allow list"

    def check(self, calling_ae: str, peer_address: str | None) -> str | None:
        """Return why ``calling_ae`` at ``peer_address`` is refused, or ``None`` if allowed."""
        if not self._rules:
            return None
        title = calling_ae.strip()
        rules = self._rules.get(title)
        if rules is None:
            return f"calling AE title {title!r} is not in the allow list"
        if any(networks is None for networks in rules):
            return None
        address = _parse_address(peer_address or "")
        if address is None:
            return f"calling AE title {title!r} from unparsable address {peer_address!r}"
        for networks in rules:
            if any(address in network for network in networks or ()):
                return None
        return f"calling AE title {title!r} is not allowed from {address}"


class DiskWatermark:
    """Refuse new instances when free space on the spool's file system is too low.

    Parameters
    ----------
    path : pathlib.Path
        A directory on the file system to watch (the spool).
    min_free_bytes : int
        Refuse when fewer bytes than this are free; ``0`` disables the check.
    """

    def __init__(self, path: Path, min_free_bytes: int) -> None:
        if min_free_bytes < 0:
            raise ValueError("min_free_bytes must not be negative")
        self.path = Path(path)
        self.min_free_bytes = min_free_bytes

    def free_bytes(self) -> int:
        """Bytes currently available to this process."""
        stats = os.statvfs(self.path)
        return stats.f_bavail * stats.f_frsize

    def check(self, incoming_bytes: int = 0) -> str | None:
        """Return why an instance of ``incoming_bytes`` is refused, or ``None`` to accept."""
        if self.min_free_bytes == 0:
            return None
        free = self.free_bytes()
        if free - incoming_bytes < self.min_free_bytes:
            return (
                f"free disk space {free // 2**20} MiB is below the watermark of "
                f"{self.min_free_bytes // 2**20} MiB"
            )
        return None
