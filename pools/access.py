"""Who may read operator data: /metrics, and /health's details (the Django side of access).

One rule for both, from METRICS_TOKEN, METRICS_ALLOWED_IPS and BEHIND_PROXY in settings.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from functools import lru_cache

from django.conf import settings
from django.http import HttpRequest

logger = logging.getLogger("pools")


@lru_cache(maxsize=8)
def _networks(
    entries: tuple[str, ...],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None:
    """The allow-list parsed, or None when an entry is invalid (then nobody is allowed)."""
    try:
        return tuple(ipaddress.ip_network(entry.strip(), strict=False) for entry in entries)
    except ValueError as exc:
        logger.error("METRICS_ALLOWED_IPS is invalid (%s); /metrics refuses everyone", exc)
        return None


# With neither METRICS_TOKEN nor METRICS_ALLOWED_IPS set, /health's details are for the machine
# itself: these clients (and none behind a proxy, where every request comes from the proxy).
LOOPBACK = ("127.0.0.0/8", "::1/128")


def operator_allowed(authorization: str, client_address: str, *, open_by_default: bool) -> bool:
    """The one access rule for operator data (/metrics, and /health's details).

    METRICS_TOKEN (a bearer token in `authorization`) and METRICS_ALLOWED_IPS (addresses or
    networks of the direct client) each must pass when set. With neither set, /metrics is
    open (`open_by_default`) and /health's details are for loopback clients only, unless
    BEHIND_PROXY says every client is the proxy.
    """
    token: str = getattr(settings, "METRICS_TOKEN", "") or ""
    allowed = tuple(entry for entry in getattr(settings, "METRICS_ALLOWED_IPS", ()) if entry)
    if not token and not allowed:
        if open_by_default:
            return True
        if getattr(settings, "BEHIND_PROXY", False):
            return False
        return _address_in(client_address, _networks(LOOPBACK))
    if token:
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            return False
    return not allowed or _address_in(client_address, _networks(allowed))


def _address_in(
    client_address: str,
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None,
) -> bool:
    """Whether the client address is in one of the networks (an IPv4 address seen through an
    IPv6 socket counts as itself); never for an unparsable address or allow-list."""
    try:
        address = ipaddress.ip_address(client_address)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return networks is not None and any(address in network for network in networks)


def scrape_allowed(request: HttpRequest) -> bool:
    """Who may scrape /metrics: `operator_allowed`, open when nothing restricts it."""
    return operator_allowed(
        request.headers.get("Authorization", ""),
        request.META.get("REMOTE_ADDR", ""),
        open_by_default=True,
    )
