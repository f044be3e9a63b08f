"""URLs without the credentials they may carry, for everything that records or prints them.

Presigned URLs (``?X-Amz-Signature=...``, ``?sig=...``, ``?token=...``) and ``user:password@host``
URLs grant access to whoever reads them. What prep records (each row's ``source``, the stats, the
manifest, the plan, log lines, error messages) keeps only the object's address: scheme, host,
port and path. A presigned URL's signature changes every time it is issued, so the address is
also what identifies an input across runs.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """``url`` without user info, query string or fragment; local paths are returned unchanged.

    >>> redact_url("https://u:pw@host:8443/a/b.tar?X-Amz-Signature=abc#f")
    'https://host:8443/a/b.tar'
    """
    if "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def redact_text(text: str) -> str:
    """``text`` (an error message, say) with every URL in it passed through :func:`redact_url`."""
    return _URL.sub(lambda match: redact_url(match.group()), text)
