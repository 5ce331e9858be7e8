"""Masking sensitive query values in URLs before they are logged."""

from functools import lru_cache
from urllib.parse import quote, unquote_plus, urlsplit, urlunsplit

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
    """The URL with credentials and values of sensitive types in its query (and userinfo) masked."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}{':' + _MASK if colon else ''}@{hostport}"
    if not parts.query:
        return urlunsplit(parts._replace(netloc=netloc))
    pairs = []
    for pair in parts.query.split("&"):
        name, equals, raw_value = pair.partition("=")
        if not equals:
            pairs.append(pair)
            continue
        value = unquote_plus(raw_value)
        if unquote_plus(name).strip().lower() in SECRET_PARAMETERS and value:
            pairs.append(f"{name}={_MASK}")
            continue
        masked = value
        result = _all_detectors().scan_query(f"v={quote(value)}")
        for finding in result.findings:
            if finding.location == "query:v":
                masked = masked.replace(finding.value, finding.masked)
        pairs.append(f"{name}={quote(masked, safe='*@') if masked != value else raw_value}")
    return urlunsplit(parts._replace(netloc=netloc, query="&".join(pairs)))
