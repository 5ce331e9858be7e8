"""Fuzz targets shared by the brief CI runs (tests/test_fuzz.py, hypothesis) and the long runs by hand
(bench/fuzz_*.py, atheris): each takes bytes and must return without an exception other than the
clear error its input deserves, within its time bound."""

from __future__ import annotations

import base64
import gzip
import tempfile
import zlib
from functools import lru_cache
from pathlib import Path

from gateway.config.load import ConfigError, load_config
from gateway.dlp import DlpConfigError, load_rules
from gateway.dlp.coding import DecodeError
from tests.gatewayproc import REPO

ID_NUMBER = "11010519491231002X"
CONTENT_TYPES = ("application/json", "text/csv; charset=gbk", "application/x-www-form-urlencoded", "text/plain",
                 "multipart/form-data; boundary=b", "application/xml", "application/octet-stream", None)
CONTENT_ENCODINGS = (None, "gzip", "deflate", "br", "zstd", "gzip, gzip", "bogus")

# Seeds from issue 20's probe and the decoders' own edge cases.
SEEDS = [
    b"a" * 4096,
    base64.b64encode(f'{{"sfzh": "{ID_NUMBER}"}}'.encode()),
    "sfzh=%31%31%30%31%30%35%31%39%34%39%31%32%33%31%30%30%32%58".encode(),
    gzip.compress(f'{{"id": "{ID_NUMBER}"}}'.encode() * 50),
    zlib.compress(b"\x00" * 100_000),  # a small bomb
    "姓名,身份证号\n张三,11010519491231002X\n".encode("gbk"),
    b"--b\r\nContent-Disposition: form-data; name=f; filename=a.csv\r\n\r\nid\r\n" + ID_NUMBER.encode() + b"\r\n--b--",
    b"\xff\xfe" + "身份证 11010519491231002X".encode("utf-16-le"),
    b"%" * 1000,
]


@lru_cache(maxsize=1)
def outbound():
    return load_rules(REPO / "config" / "dlp").profile("outbound")


def scan_and_redact(data: bytes, content_type: str | None, content_encoding: str | None) -> None:
    """Decode, scan and (where it finds anything) redact a body: a DecodeError is the only refusal."""
    profile = outbound()
    result = profile.scan(data, content_type=content_type, content_encoding=content_encoding, direction="request")
    if result.findings:
        try:
            redacted = profile.redact(data, content_type=content_type, content_encoding=content_encoding,
                                      result=result)
        except DecodeError:
            return
        assert isinstance(redacted, bytes)


def load_rules_text(text: bytes) -> None:
    """A rule file of any content: loads, or a DlpConfigError naming file and line."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rules.yaml"
        path.write_bytes(text)
        try:
            load_rules(path)
        except DlpConfigError as e:
            assert all(str(path) in error for error in e.errors), e.errors


def load_config_text(text: bytes) -> None:
    """A configuration of any content: loads, or a ConfigError whose every line names a file."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "gateway.yaml"
        path.write_bytes(text)
        try:
            load_config(path)
        except ConfigError as e:
            assert e.errors and all(":" in error for error in e.errors), e.errors
