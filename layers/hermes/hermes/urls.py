"""Host URLs as Hermes may show them: in errors, job records, logs and /v1/status."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def public_url(url: str) -> str:
    """A URL safe to show: scheme, host and port only. A user, password, query or path may
    carry a secret (`http://user:pw@gpu/?token=…`, a proxy's `/t/<token>/`): a path is shown
    as `/…`, the rest left out."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:  # not a URL at all (an unbracketed IPv6, a bad port): nothing of it
        return "<invalid URL>"
    netloc = f"[{host}]" if ":" in host else host
    if port:
        netloc += f":{port}"
    path = "/…" if parts.path.strip("/") else ""
    return urlunsplit((parts.scheme, netloc, path, "", ""))
