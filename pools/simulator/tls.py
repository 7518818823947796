"""Throw-away TLS material for the simulator.

A fresh in-memory CA per simulator means TLS paths (handshakes, verification failures, CA
bundles) can be tested offline without any certificate files checked into the tree.
"""

import os
import ssl
from collections.abc import Iterable

import trustme

__all__ = ["SimulatorTLS"]

_ALWAYS_NAMES = ("127.0.0.1", "localhost", "::1")
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


class SimulatorTLS:
    """A private CA plus one leaf certificate for the hosts the simulator answers on.

    Creating one generates keys (CPU work), so async callers should build it in a thread.
    """

    def __init__(self, hosts: Iterable[str] = ()) -> None:
        names = list(
            dict.fromkeys([*(h for h in hosts if h not in _WILDCARD_HOSTS), *_ALWAYS_NAMES])
        )
        self._ca = trustme.CA(organization_name="Carlos LLM simulator")
        self._leaf = self._ca.issue_cert(*names)
        self.names: tuple[str, ...] = tuple(names)

    def server_context(self) -> ssl.SSLContext:
        """The context the listener serves with (HTTP/1.1 only, as the simulator speaks h11)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._leaf.configure_cert(context)
        context.set_alpn_protocols(["http/1.1"])
        return context

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts only this simulator's CA."""
        context = ssl.create_default_context()
        self._ca.configure_trust(context)
        return context

    def ca_pem(self) -> bytes:
        """The CA certificate, PEM-encoded, for clients configured with a CA bundle path."""
        return self._ca.cert_pem.bytes()

    def write_ca_pem(self, path: str | os.PathLike[str]) -> None:
        """Write the CA certificate so another process (or an env var) can trust it."""
        self._ca.cert_pem.write_to_path(os.fspath(path))
