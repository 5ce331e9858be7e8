"""DLP engine: validated detection of sensitive data in HTTP bodies, in every encoding they travel in.

A plain library (no proxy, no network). Usage:

    rules = load_rules("config/dlp")
    result = rules.profile("outbound").scan(body, content_type=..., content_encoding=...)
    if result.action == "block": ...
"""

from gateway.dlp.engine import Finding, Profile, RuleSet, ScanResult, load_rules
from gateway.dlp.rules import DlpConfigError
from gateway.dlp.stream import StreamScan
from gateway.dlp.urlmask import mask_method, mask_text, mask_url

__all__ = ["DlpConfigError", "Finding", "Profile", "RuleSet", "ScanResult", "StreamScan", "load_rules",
           "mask_method", "mask_text", "mask_url"]
