"""Keys out of error text: what an endpoint says about a key never reaches a page, a zip or a log.

An endpoint that refuses a key quotes it back, masked (`Incorrect API key provided:
sk-********1234.`) or, from some proxies, whole; a header or URL in an exception's text can
carry one too. Users are shown a category instead of that text (`agents.pipeline.
describe_error`); what goes to the log keeps the detail with every key-like token replaced.

Hand-written patterns rather than a library: the secret scanners on the package index
(detect-secrets and the like) scan files for commits and are far heavier than five regular
expressions over one line of error text. The patterns err on the side of hiding: a request
id of 32+ random characters is hidden too, which costs an operator nothing they need.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from django.conf import settings

REDACTED = "[redacted]"
# Known secrets shorter than this are not replaced verbatim (a 4-letter "key" would hide
# ordinary words); the patterns below still catch them in the shapes keys take.
MIN_KNOWN_SECRET_LENGTH = 8

# (pattern, replacement); a replacement keeps a label in group 1 ("Bearer ", "api-key: ").
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Credentials in a URL: scheme://user:password@host.
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.\-]*://)[^/\s:@]*:[^/\s@]*@"), rf"\1{REDACTED}@"),
    # Authorization header values.
    (re.compile(r"(?i)(\b(?:bearer|basic)\s+)[A-Za-z0-9._~+/=\-]+"), rf"\1{REDACTED}"),
    # A key or token after its name: api-key: x, api_key=x, "subscription-key": "x" ...
    (
        re.compile(
            r"(?i)(\b(?:api[-_ ]?key|subscription[-_ ]?key|access[-_ ]?token|secret|password)"
            r"[\"']?\s*[:=]\s*[\"']?)[^\s\"',;}&]+"
        ),
        rf"\1{REDACTED}",
    ),
    # OpenAI-style keys, whole or masked: sk-..., sk-proj-..., sk-********1234.
    (re.compile(r"\bsk-[A-Za-z0-9_*\-]{2,}"), REDACTED),
    # Any masked token (four or more asterisks with what they hide around them).
    (re.compile(r"[^\s'\"(\[]*\*{4,}[^\s'\".,;)\]]*"), REDACTED),
    # JSON Web Tokens (Entra ID access tokens).
    (re.compile(r"\beyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]*)?"), REDACTED),
    # Long random tokens of letters and digits: Azure keys (32 hex or 84 alphanumeric) and
    # other vendors' keys. Hyphenated names (deployments, hosts) do not match.
    (re.compile(r"\b(?=[A-Za-z0-9]*\d)(?=[A-Za-z0-9]*[A-Za-z])[A-Za-z0-9]{32,}\b"), REDACTED),
)


def known_secrets() -> list[str]:
    """The endpoint keys this server is configured with (longest first)."""
    endpoint = getattr(settings, "CARLOS_POOLS", {}).get("ENDPOINT", {})
    keys = {str(endpoint.get(name) or "") for name in ("API_KEY", "AZURE_API_KEY")}
    return sorted((k for k in keys if len(k) >= MIN_KNOWN_SECRET_LENGTH), key=len, reverse=True)


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """`text` with the configured keys and anything shaped like a key replaced by [redacted]."""
    for secret in known_secrets() if secrets is None else secrets:
        text = text.replace(secret, REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactSecrets(logging.Filter):
    """Redacts a record's message and traceback before any handler formats them.

    Attached to the `agents` logger, so a failure logged anywhere in the pipeline or the
    pages (including an unexpected exception's traceback) cannot carry a key to the log.
    """

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True
