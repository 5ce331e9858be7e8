"""What mitmproxy logs of a message it cannot parse (a bad request line, a header line without a colon,
a crash's traceback) quotes the client's or the upstream's bytes: masked, as everything the gateway
itself logs, before any handler writes it (an ID number, a URL's password)."""

from __future__ import annotations

import logging
import re

from gateway.dlp import mask_text

_PASSWORD_IN_URL = re.compile(r"(//[^/\s:@'\"]*:)[^@\s/'\"]+@")
# What a record must hold to be worth a scan (mask_text costs ~0.3 ms a new text; mitmproxy logs several
# lines a connection, "server connect 10.1.2.3:443"): quoted wire bytes, an @, or six digits in a row,
# which every number a detector takes has (but a grouped mobile, which only quoted bytes can hold here).
_MAY_HOLD_A_VALUE = re.compile(r"b'|b\"|@|[0-9\uff10-\uff19]{6}")


def masked(text: str) -> str:
    if not _MAY_HOLD_A_VALUE.search(text):
        return text
    return mask_text(_PASSWORD_IN_URL.sub(r"\1***@", text))


class MaskedMitmproxyRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("mitmproxy"):
            message = record.getMessage()
            if (shown := masked(message)) != message:
                record.msg, record.args = shown, None
            if record.exc_info and not record.exc_text:
                record.exc_text = masked(logging.Formatter().formatException(record.exc_info))
        return True


def install() -> None:
    """On the handlers of the root logger (a logger's own filters would miss its children's records)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, MaskedMitmproxyRecords) for f in handler.filters):
            handler.addFilter(MaskedMitmproxyRecords())
