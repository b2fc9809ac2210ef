"""Callback URLs: which ones a worker may call (no server-side request forgery).

A callback URL is http(s), and every address its host resolves to is a public one: not
loopback, private, link-local, shared, multicast, reserved or otherwise special. Hosts named in
``CORRAL_WEBHOOK_ALLOWED_HOSTS`` are exempt (a receiver inside the network, a test's). The check
runs at submission, and the deliverer checks the address it actually connects to again, since
DNS may answer differently by then (:func:`peer_allowed`).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from tasks.errors import InvalidRequest
from tasks.settings import Settings

FIELD = "callback_url"
MAX_URL_CHARS = 2048
ALLOW_HINT = (
    "; give a public http(s) URL, or add the host to CORRAL_WEBHOOK_ALLOWED_HOSTS if this "
    "receiver is meant to be reached inside your network"
)


NAT64 = ipaddress.ip_network("64:ff9b::/96")  # IPv6 addresses a NAT64 gateway maps to IPv4


def is_public(address: str) -> bool:
    """True for a global unicast address. An IPv6 address that carries an IPv4 one (mapped,
    6to4, NAT64) is judged by the IPv4 address it leads to."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in NAT64:
            return is_public(str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            return is_public(str(embedded))
    return ip.is_global and not ip.is_multicast


def peer_allowed(host: str, address: str, allowed_hosts: frozenset[str]) -> bool:
    """May a delivery to ``host`` go to a socket connected to ``address``?"""
    return host.lower().strip("[]") in allowed_hosts or is_public(address)


def check_callback_url(url: object, settings: Settings) -> str:
    """``url`` if a worker may call it back, else :class:`InvalidRequest` on ``callback_url``.

    Resolves the host name (a blocking DNS lookup). Needs ``CORRAL_WEBHOOK_SECRET``, so that
    no callback is accepted that could never be signed.
    """
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
        raise InvalidRequest(
            f"{FIELD}: expected an http(s) URL of at most {MAX_URL_CHARS} characters",
            field=FIELD,
        )
    if settings.webhook_secret is None:
        raise InvalidRequest(
            f"{FIELD}: CORRAL_WEBHOOK_SECRET is not set, so deliveries could not be signed; set "
            "it to a whsec_ secret shared with the receiver (whsec_$(openssl rand -base64 32))",
            field=FIELD,
        )
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise InvalidRequest(f"{FIELD}: {url!r} is not a valid URL ({exc})", field=FIELD) from exc
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise InvalidRequest(f"{FIELD}: {url!r} is not an http(s) URL with a host", field=FIELD)
    if not url.isprintable() or any(c.isspace() for c in url):
        raise InvalidRequest(f"{FIELD}: the URL holds spaces or control characters", field=FIELD)
    if parts.username is not None or parts.password is not None:
        raise InvalidRequest(
            f"{FIELD}: put no credentials in the URL (user:password@); deliveries are signed, "
            "so the receiver authenticates them with CORRAL_WEBHOOK_SECRET",
            field=FIELD,
        )
    if host in settings.webhook_hosts:
        return url
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise InvalidRequest(
            f"{FIELD}: host {host!r} does not resolve ({exc}); check the URL", field=FIELD
        ) from exc
    for *_, sockaddr in infos:
        address = str(sockaddr[0])
        if not is_public(address):
            raise InvalidRequest(
                f"{FIELD}: host {host!r} resolves to {address}, which is not a public address"
                + ALLOW_HINT,
                field=FIELD,
            )
    return url
