"""Masking sensitive values in URLs and texts before they are logged or recorded."""

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


@lru_cache(maxsize=1)
def _all_detectors():
    from gateway.dlp.engine import Profile
    rule = Rule(id="mask_url", description="every built-in detector", action="audit", severity="low",
                direction="both", detectors=tuple(DETECTORS))
    return Profile(ProfileSpec("mask_url", "", (rule,), "audit", Limits()))


def mask_url(url: str) -> str:
    """The URL with credentials and values of sensitive types in its path and query (and userinfo) masked."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}{':' + _MASK if colon else ''}@{hostport}"
    # One scan of the whole path and query first: most URLs hold nothing to mask part by part.
    whole = unquote_plus(f"{parts.path}?{parts.query}")
    sensitive = bool(whole.strip("/?")) and mask_text(whole) != whole
    path = _masked_part(parts.path, unquote, "/*@:;,=+~!$&'()") if sensitive else parts.path
    pairs = []
    for pair in parts.query.split("&") if parts.query else []:
        raw_name, equals, raw_value = pair.partition("=")
        name = _masked_part(raw_name, unquote_plus, "*@") if sensitive else raw_name
        if equals and unquote_plus(raw_name).strip().lower() in SECRET_PARAMETERS and raw_value:
            pairs.append(f"{name}={_MASK}")
        else:
            pairs.append(f"{name}{equals}{_masked_part(raw_value, unquote_plus, '*@') if sensitive else raw_value}")
    return urlunsplit(parts._replace(netloc=netloc, path=path, query="&".join(pairs)))


def mask_text(text: str) -> str:
    """`text` with the values of sensitive types in it masked (for what is logged or recorded)."""
    masked = text
    for finding in _all_detectors().scan_fields([("text", "", text)]).findings:
        masked = masked.replace(finding.value, finding.masked)
    return masked


def _masked_part(raw: str, decode: Callable[[str], str], safe: str) -> str:
    """A raw URL part (path, parameter name or value) with the sensitive values it decodes to masked;
    unchanged, as written, when it holds none."""
    text = decode(raw)
    if not text.strip("/"):
        return raw
    masked = mask_text(text)
    return quote(masked, safe=safe) if masked != text else raw
