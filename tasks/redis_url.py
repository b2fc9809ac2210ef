"""The Redis URL forms ollama-corral accepts, and how a URL is shown without its password.

redis-py, kombu (the broker) and Celery's result backend each read a ``rediss://`` URL's query
differently: redis-py accepts only ``ssl_cert_reqs=none|optional|required``, Celery's backend
refuses a ``rediss://`` URL without ``ssl_cert_reqs``, and kombu then falls back to *no*
certificate check. :func:`normalise_redis_url` writes the one form all three read the same way
(certificates verified unless the URL says otherwise), so a URL that works for one works for
all.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SCHEMES = ("redis", "rediss")
MASK = "**"  # what Celery's own logs print in place of a password
CERT_REQS = {
    "none": "none",
    "optional": "optional",
    "required": "required",
    "cert_none": "none",
    "cert_optional": "optional",
    "cert_required": "required",
}
TRUE, FALSE = ("1", "true", "yes", "y", "t", "on"), ("0", "false", "no", "n", "f", "off")
FILE_PARAMS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
URL_FORMS = (
    "redis://[[user]:password@]host[:port][/db], or rediss://… for TLS (?ssl_ca_certs=, "
    "ssl_certfile=, ssl_keyfile=, ssl_cert_reqs=, ssl_check_hostname=)"
)


def normalise_redis_url(url: str) -> str:
    """``url`` in the form redis-py, kombu and Celery all read alike; ValueError if it is not
    a Redis URL (the message says what is expected)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise ValueError(f"not a Redis URL; expected {URL_FORMS}")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port ({exc}); expected {URL_FORMS}") from None
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    tls_params = sorted(k for k in query if k.startswith("ssl_"))
    if parts.scheme == "redis":
        if tls_params:
            raise ValueError(f"{', '.join(tls_params)} need a rediss:// URL (TLS)")
        return url.strip()
    reqs = query.get("ssl_cert_reqs", "required")
    if reqs.lower() not in CERT_REQS:
        raise ValueError(f"ssl_cert_reqs={reqs!r}: expected required, optional or none")
    query["ssl_cert_reqs"] = CERT_REQS[reqs.lower()]
    if "ssl_check_hostname" in query:
        flag = query["ssl_check_hostname"].lower()
        if flag not in TRUE + FALSE:
            raise ValueError(f"ssl_check_hostname={flag!r}: expected true or false")
        query["ssl_check_hostname"] = "true" if flag in TRUE else "false"
    for name in FILE_PARAMS:
        if name in query and not os.path.isfile(query[name]):
            raise ValueError(f"{name}={query[name]}: no such file")
    return urlunsplit(parts._replace(query=urlencode(query, safe="/")))


def masked(url: str) -> str:
    """``url`` with its password replaced by ``**`` (in the user part and in the query)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    netloc = parts.netloc
    if password is not None:
        netloc = f"{parts.username or ''}:{MASK}@{netloc.rpartition('@')[2]}"
    query = parts.query
    if "password" in query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, MASK if "password" in k else v) for k, v in pairs], safe="/*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))
