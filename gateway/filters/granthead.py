"""The head of a response to a grant for some fields: only standard fields describing the body leave.

A grant for some fields lets nothing but the records' granted fields leave (docs/authz.md). A header
or trailer field is not a record's field: an upstream's `X-Resident-Name` or `Link` can carry as much
personal data as its body. Failing closed, only the fields listed here pass (the body's type, length
and content coding, the framing, dates and caching); every other header field, and every trailer field,
is removed, and its name recorded. `ETag` is not listed: it is free text chosen by the upstream, and it
names the upstream's whole representation, not the reduced one that leaves. `Connection` passes only
as `close` or `keep-alive` (the gateway's own `close` when it stops; any other value is free text).
"""

from __future__ import annotations

from mitmproxy import http

from gateway.transfer.model import TRANSFER_ID_HEADER, WARNING_HEADER

STANDARD_FIELDS = frozenset(name.lower() for name in (
    "Content-Type", "Content-Length", "Content-Encoding", "Content-Language", "Transfer-Encoding",
    "Date", "Last-Modified", "Expires", "Cache-Control", "Vary",
    TRANSFER_ID_HEADER, WARNING_HEADER))  # (the gateway's own)
CONNECTION_VALUES = frozenset((b"close", b"keep-alive"))


def keep_standard_fields(response: http.Response) -> list[str]:
    """Removes the response's header fields not listed, and its trailer fields; their names
    (`header:NAME`, `trailer:NAME`), once each, in order."""
    dropped: dict[str, None] = {}
    kept = []
    for name, value in response.headers.fields:
        lower = name.lower()
        if lower.decode("latin-1") in STANDARD_FIELDS or (
                lower == b"connection" and value.strip().lower() in CONNECTION_VALUES):
            kept.append((name, value))
        else:
            dropped[f"header:{name.decode('utf-8', 'replace')}"] = None
    if len(kept) != len(response.headers.fields):
        response.headers.fields = tuple(kept)
    if response.trailers:
        dropped.update((f"trailer:{name.decode('utf-8', 'replace')}", None) for name, _ in response.trailers.fields)
        response.trailers = None
    return list(dropped)
