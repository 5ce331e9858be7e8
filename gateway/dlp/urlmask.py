"""Masking sensitive values in URLs and texts before they are logged or recorded."""

import re
from collections.abc import Callable
from functools import lru_cache
from urllib.parse import quote, unquote, unquote_plus, urlsplit, urlunsplit

from gateway.dlp.decode import Limits
from gateway.dlp.detectors import DETECTORS
from gateway.dlp.rules import ProfileSpec, Rule

# Parameter names whose values are credentials: masked whole, whatever they contain.
SECRET_PARAMETERS = frozenset(
    "password passwd pwd pass token access_token refresh_token id_token secret client_secret api_key apikey "
    "key sign signature sig auth authorization session sessionid session_id sid ticket credential".split()
)
_MASK = "***"
# Where letters meet digits in a host name: a DNS label such as `x<ID number>` holds the number with
# no word boundary before it, which every detector needs.
_LETTERS_MEET_DIGITS = re.compile(r"(?<=[^\W\d_])(?=\d)|(?<=\d)(?=[^\W\d_])|_")
_LETTERS_MEET_DIGITS_BUT_X = re.compile(r"(?<=[^\W\d_])(?=\d)|(?<=\d)(?=[^\W\d_xX])|(?<=\d[xX])(?=[^\W\d_])|_")


@lru_cache(maxsize=2)
def every_detector(action: str = "audit"):
    """A profile of one rule with every built-in detector, whose findings (and uninspectable content) get `action`."""
    from gateway.dlp.engine import Profile
    rule = Rule(id=f"every_detector_{action}", description="every built-in detector", action=action,
                severity="low" if action == "audit" else "high", direction="both", detectors=tuple(DETECTORS))
    return Profile(ProfileSpec(rule.id, "", (rule,), action, Limits()))


def mask_url(url: str) -> str:
    """The URL with credentials and values of sensitive types in its path, query and fragment (and userinfo)
    masked."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}{':' + _MASK if colon else ''}@{hostport}"
    # One scan of the whole path, query and fragment first: most URLs hold nothing to mask part by part.
    # (A client may send a fragment in its request line: it is recorded as sent, so masked as the path.)
    whole = unquote_plus(f"{parts.path}?{parts.query}#{parts.fragment}")
    sensitive = bool(whole.strip("/?#")) and mask_text(whole) != whole
    path = _masked_part(parts.path, unquote, "/*@:;,=+~!$&'()") if sensitive else parts.path
    fragment = _masked_part(parts.fragment, unquote, "/*@:;,=+~!$&'()?") if sensitive else parts.fragment
    pairs = []
    for pair in parts.query.split("&") if parts.query else []:
        raw_name, equals, raw_value = pair.partition("=")
        name = _masked_part(raw_name, unquote_plus, "*@") if sensitive else raw_name
        if equals and unquote_plus(raw_name).strip().lower() in SECRET_PARAMETERS and raw_value:
            pairs.append(f"{name}={_MASK}")
        else:
            pairs.append(f"{name}{equals}{_masked_part(raw_value, unquote_plus, '*@') if sensitive else raw_value}")
    return urlunsplit(parts._replace(netloc=netloc, path=path, query="&".join(pairs), fragment=fragment))


STANDARD_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"))


def mask_method(method: str) -> str:
    """A standard method holds nothing to mask (masking it anyway cost ~2.5 us a transfer); any other is
    a client's text, masked."""
    return method if method in STANDARD_METHODS else mask_text(method)


def mask_text(text: str) -> str:
    """`text` with the values of sensitive types in it masked (for what is logged or recorded)."""
    masked = text
    for finding in every_detector().scan_fields([("text", "", text)]).findings:
        masked = masked.replace(finding.value, finding.masked)
    return masked


def host_words(host: str) -> list[str]:
    """How a host name is read besides as written: its digits apart from the letters around them
    (once with a check character `X` after digits kept, once not), so a number inside a label is
    seen; nothing when no letter touches a digit."""
    apart = _LETTERS_MEET_DIGITS.sub(" ", host)
    if apart == host:
        return []
    return [apart, _LETTERS_MEET_DIGITS_BUT_X.sub(" ", host)]


def mask_host(host: str) -> str:
    """`host` with the sensitive values in it masked, also those inside a label (see host_words)."""
    masked = mask_text(host)
    for words in host_words(host):
        for finding in every_detector().scan_fields([("text", "", words)]).findings:
            masked = masked.replace(finding.value, finding.masked)  # no space was put inside a value
    return masked


def _masked_part(raw: str, decode: Callable[[str], str], safe: str) -> str:
    """A raw URL part (path, parameter name or value) with the sensitive values it decodes to masked;
    unchanged, as written, when it holds none."""
    text = decode(raw)
    if not text.strip("/"):
        return raw
    masked = mask_text(text)
    return quote(masked, safe=safe) if masked != text else raw
