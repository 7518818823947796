"""The WebSocket Origin check: only this site's own pages may open its sockets.

A browser sends the user's cookies with every WebSocket handshake, whatever page opens it,
and cookies do not depend on the port or the scheme: without an exact Origin check, a page
on `http://localhost:9999` (or any site the user visits) could watch the user's designs live
(cross-site WebSocket hijacking). Channels' `AllowedHostsOriginValidator` compares host names
only, so it let other ports and schemes through.

The rule is Django's for form posts (`CsrfViewMiddleware`), applied to the handshake. The
Origin must be, in scheme, host and port (default ports filled in):

- the address the socket was opened on: the `Host` header (`X-Forwarded-Host` with
  `USE_X_FORWARDED_HOST`), a host in `ALLOWED_HOSTS`, and `https` when the socket is `wss` or
  `SECURE_PROXY_SSL_HEADER` says the proxy in front received HTTPS; or
- one of `WS_ALLOWED_ORIGINS` (`DJANGO_WS_ALLOWED_ORIGINS`, by default
  `CSRF_TRUSTED_ORIGINS`), matched by Channels' `OriginValidator`: `https://app.example.com`
  exactly, `https://*.example.com` (or `https://.example.com`) for that domain and its
  subdomains.

A missing, `null`, repeated or malformed Origin is refused, as is a Host outside
`ALLOWED_HOSTS`. A refusal is an HTTP 403 to the handshake (Daphne), before any consumer runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any
from urllib.parse import SplitResult, urlsplit

from channels.security.websocket import OriginValidator, WebsocketDenier
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http.request import split_domain_port, validate_host

logger = logging.getLogger(__name__)

SETTING = "WS_ALLOWED_ORIGINS"
VARIABLE = "DJANGO_WS_ALLOWED_ORIGINS"
WEB_SCHEMES = frozenset({"http", "https"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_origin(value: str) -> SplitResult | None:
    """`value` as a serialized origin (`scheme://host[:port]` and nothing else), or None."""
    try:
        parts = urlsplit(value)
        port = parts.port  # a port that is not a number in 0-65535 raises here
    except ValueError:
        return None
    if (
        parts.scheme not in WEB_SCHEMES
        or not parts.hostname
        or "@" in parts.netloc
        or parts.path
        or parts.query
        or parts.fragment
        or value != value.strip()
        or (port is not None and port == 0)
    ):
        return None
    return parts


def same_origin(a: SplitResult, b: SplitResult) -> bool:
    """Scheme, host and port equal, with the scheme's default port when none is written."""
    return (
        a.scheme == b.scheme
        and a.hostname == b.hostname
        and (a.port or DEFAULT_PORTS[a.scheme]) == (b.port or DEFAULT_PORTS[b.scheme])
    )


def allowed_origin_patterns(origins: Iterable[str]) -> list[str]:
    """The configured origins as Channels' patterns; ImproperlyConfigured names what is wrong.

    Django's `https://*.example.com` becomes Channels' `https://.example.com`. `*` (any
    origin) is refused: it would reopen the sockets to every site.
    """
    patterns, wrong = [], []
    for origin in origins:
        pattern = origin.replace("://*.", "://.", 1)
        parsed = parse_origin(pattern.replace("://.", "://", 1))
        if parsed is None:
            wrong.append(origin)
        else:
            patterns.append(pattern.lower())
    if wrong:
        raise ImproperlyConfigured(
            f"{VARIABLE} (settings.{SETTING}, by default CSRF_TRUSTED_ORIGINS) must list full "
            "origins, scheme://host[:port] such as https://carlos.example.com or "
            f"https://*.example.com; not {', '.join(repr(origin) for origin in wrong)}"
        )
    return patterns


def header(scope: dict[str, Any], name: bytes) -> list[str]:
    """Every value of one request header, as Daphne passes them (bytes, names lowercased)."""
    return [value.decode("latin-1") for key, value in scope.get("headers", ()) if key == name]


def meta_header(scope: dict[str, Any], meta_name: str) -> str | None:
    """A header by its Django META name (`HTTP_X_FORWARDED_PROTO`), as Django reads it."""
    if not meta_name.startswith("HTTP_"):
        return None
    values = header(scope, meta_name[5:].lower().replace("_", "-").encode())
    return values[0] if len(values) == 1 else None


def site_origin(scope: dict[str, Any]) -> SplitResult | None:
    """The origin the socket was opened on, as the browser saw it, if its host is allowed."""
    host = None
    if settings.USE_X_FORWARDED_HOST:
        host = meta_header(scope, "HTTP_X_FORWARDED_HOST")
    if host is None:
        hosts = header(scope, b"host")
        host = hosts[0] if len(hosts) == 1 else None
    if not host:
        return None
    domain, _ = split_domain_port(host)
    allowed = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed:
        allowed = [".localhost", "127.0.0.1", "[::1]"]  # as Django's HttpRequest.get_host
    if not domain or not validate_host(domain, allowed):
        return None
    secure = scope.get("scheme") in ("wss", "https")
    proxy = settings.SECURE_PROXY_SSL_HEADER
    if proxy:
        name, secure_value = proxy
        forwarded = meta_header(scope, name)
        if forwarded is not None:
            secure = forwarded.split(",", 1)[0].strip() == secure_value
    return parse_origin(f"{'https' if secure else 'http'}://{host}")


class SiteOriginValidator(OriginValidator):
    """Lets a handshake through only from this site's own origin or a configured one.

    The origins are read from settings at each handshake (a test's override applies), and
    checked once at start-up, so a wrong `DJANGO_WS_ALLOWED_ORIGINS` stops the server there.
    """

    def __init__(self, application: Any) -> None:
        super().__init__(application, allowed_origin_patterns(getattr(settings, SETTING, ())))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] != "websocket":
            raise ValueError("SiteOriginValidator only guards WebSocket connections")
        if self.trusted(scope):
            return await self.application(scope, receive, send)
        return await WebsocketDenier()(scope, receive, send)

    def trusted(self, scope: dict[str, Any]) -> bool:
        origins = header(scope, b"origin")
        origin = parse_origin(origins[0]) if len(origins) == 1 else None
        if origin is not None:
            own = site_origin(scope)
            if own is not None and same_origin(origin, own):
                return True
            patterns = allowed_origin_patterns(getattr(settings, SETTING, ()))
            if any(self.match_allowed_origin(origin, pattern) for pattern in patterns):
                return True
        logger.info(
            "refused a WebSocket handshake to %r from origin %r (host %r)",
            scope.get("path", ""),
            origins[0][:200] if len(origins) == 1 else origins[:2],
            header(scope, b"host")[:2],
        )
        return False
