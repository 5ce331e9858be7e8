"""`gateway dlp scan | explain | test`: the DLP engine on the command line, for the people who tune rules.

The main CLI calls `register(subparsers)`; each subcommand returns its exit status:
scan: 0 nothing found, 1 something found, 2 error; test: 0 all examples pass, 1 a failure, 2 error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from gateway.dlp import (
    DlpConfigError,
    Profile,
    RuleSet,
    ScanResult,
    load_rules,
    mask_url,
)
from gateway.dlp.explain import explain

DEFAULT_RULES = Path(__file__).resolve().parents[2] / "config" / "dlp"
DIRECTION_PROFILES = {"request": "outbound", "response": "inbound"}


def register(subparsers: argparse._SubParsersAction) -> None:
    dlp = subparsers.add_parser("dlp", help="scan files with the DLP rules, explain a value, test the rules")
    commands = dlp.add_subparsers(dest="dlp_command", required=True, metavar="{scan,explain,test}")

    scan = commands.add_parser("scan", help="scan files, raw HTTP messages or mitmproxy flow files",
                               description="Print one JSON object per finding. Exit 0: nothing found, "
                                           "1: something found, 2: error.")
    scan.add_argument("paths", nargs="*", metavar="PATH", help="files to scan ('-' reads standard input)")
    _rules_option(scan)
    scan.add_argument("--profile", help="profile name (default: outbound for requests, inbound for responses)")
    scan.add_argument("--direction", choices=["request", "response"],
                      help="direction of the content (default: request; from the start line with --http)")
    scan.add_argument("--http", action="store_true",
                      help="each file is a raw HTTP/1.1 request or response; its headers apply")
    scan.add_argument("--content-type", help="Content-Type of the files")
    scan.add_argument("--content-encoding", help="Content-Encoding of the files (gzip, deflate, br, zstd)")
    scan.add_argument("--flows", action="append", default=[], metavar="FILE",
                      help="rescan the requests and responses saved in a mitmproxy flow file")
    scan.add_argument("--host", help="the upstream host the content went to or came from, for rules' "
                                     "exceptions.hosts (default: a request's own, from --http or --flows)")
    scan.add_argument("--show-values", action="store_true", help="include clear values in the output")
    scan.set_defaults(func=scan_command)

    explain_parser = commands.add_parser("explain", help="show which detector looked at a value and why it "
                                                         "matched or not")
    explain_parser.add_argument("value", metavar="VALUE_OR_FILE")
    _rules_option(explain_parser)
    explain_parser.add_argument("--profile", default="outbound", help="profile whose rules are shown (default: outbound)")
    explain_parser.set_defaults(func=explain_command)

    test = commands.add_parser("test", help="run every rule's examples")
    test.add_argument("rules_dir", nargs="?", type=Path, default=DEFAULT_RULES, metavar="RULES",
                      help="rule file or folder (default: the shipped config/dlp)")
    test.add_argument("--engine", choices=["hyperscan", "re"], help="matcher engine (default: best available)")
    test.set_defaults(func=test_command)


def _rules_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rules", type=Path, default=DEFAULT_RULES,
                        help="rule file or folder of *.yaml (default: the shipped config/dlp)")


def _load(path: Path, engine: str | None = None) -> RuleSet | None:
    try:
        return load_rules(path, engine=engine)
    except DlpConfigError as error:
        for line in error.errors:
            print(line, file=sys.stderr)
        return None


def _profile(rules: RuleSet, name: str | None, direction: str) -> Profile:
    return rules.profile(name or DIRECTION_PROFILES[direction])


# scan -------------------------------------------------------------------------------------------------
def scan_command(args: argparse.Namespace) -> int:
    if not args.paths and not args.flows:
        print("gateway dlp scan: give at least one PATH ('-' for standard input) or --flows FILE", file=sys.stderr)
        return 2
    rules = _load(args.rules)
    if rules is None:
        return 2
    found = False
    try:
        for source, direction, body, content_type, content_encoding, head, host in _inputs(args):
            profile = _profile(rules, args.profile, direction)
            host = args.host or host  # as the gateway passes the transfer's upstream host
            result = profile.scan(body, content_type=content_type, content_encoding=content_encoding,
                                  direction=direction, host=host)
            if head:
                extra = profile.scan_head(*head, direction=direction, host=host)
                result = ScanResult(extra.findings + result.findings,
                                    extra.action if not result.action else result.action,
                                    extra.groups + result.groups, {**extra.replacements, **result.replacements})
            found |= _print_findings(source, profile.name, result, args.show_values)
    except (OSError, ValueError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"gateway dlp scan: {message}", file=sys.stderr)
        return 2
    return 1 if found else 0


def _print_findings(source: str, profile: str, result: ScanResult, show_values: bool) -> bool:
    for finding in result.findings:
        record = {"source": source, "profile": profile, "rule": finding.rule, "type": finding.type,
                  "action": finding.action, "severity": finding.severity, "location": finding.location,
                  "masked": finding.masked, "field": finding.field, "confidence": finding.confidence,
                  "place": finding.place}  # what a group's digest covers (gateway.dlp.tally)
        if show_values:
            record["value"] = finding.value
        print(json.dumps(record, ensure_ascii=False), flush=True)
    listed = Counter((f.rule, f.type, f.action) for f in result.findings)
    for group in result.groups:  # past the profile's limits.max_findings: counted, not listed
        if group.count > listed[(group.rule, group.type, group.action)]:
            print(f"gateway dlp scan: {source}: {group.count - listed[(group.rule, group.type, group.action)]} "
                  f"more findings of rule {group.rule} ({group.type}) not listed (profile {profile}'s "
                  f"limits.max_findings); all {group.count} places' SHA-256: {group.locations_sha256}",
                  file=sys.stderr)
    return bool(result.groups)


# A head as the gateway inspects it (Profile.scan_head): a request's path with its query and its header
# fields; a response's header fields (path "/").
Head = tuple[str, list[tuple[str, str]]]
# source, direction, body, type, encoding, head, and the upstream host when the input names it
Input = tuple[str, str, bytes, str | None, str | None, Head | None, str | None]


def _inputs(args: argparse.Namespace) -> Iterator[Input]:
    for path in args.paths:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
        if args.http:
            yield (path, *parse_http_message(data, path))
        else:
            yield path, args.direction or "request", data, args.content_type, args.content_encoding, None, None
    for flow_file in args.flows:
        yield from _flow_inputs(flow_file)


def parse_http_message(data: bytes, source: str) -> tuple[str, bytes, str | None, str | None, Head | None,
                                                          str | None]:
    """(direction, body, content type, content encoding, head, host) of a raw HTTP/1.1 message; the host
    is a request's (its absolute URL's, else its Host header's), None for a response."""
    separator = b"\r\n\r\n" if b"\r\n\r\n" in data else b"\n\n"
    head, found, body = data.partition(separator)
    if not found:
        raise ValueError(f"{source}: not an HTTP message (no blank line after the headers)")
    lines = head.decode("latin-1").splitlines()
    start_line = lines[0] if lines else ""
    fields: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"{source}: malformed header line {line!r}")
        fields.append((name.strip(), value.strip()))
    headers = {name.lower(): value for name, value in fields}
    host = None
    if start_line.startswith("HTTP/"):
        direction, head = "response", ("/", fields)
    else:
        parts = start_line.split()
        if len(parts) != 3:
            raise ValueError(f"{source}: malformed start line {start_line!r}")
        target = urlsplit(parts[1])  # an absolute URL (to a proxy) or a path
        path = target.path + (f"?{target.query}" if target.query else "")
        direction, head = "request", (path, fields)
        host = target.hostname or urlsplit(f"//{headers.get('host', '')}").hostname
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(body, source)
    return direction, body, headers.get("content-type"), headers.get("content-encoding"), head, host


def _dechunk(body: bytes, source: str) -> bytes:
    out, position = bytearray(), 0
    while True:
        line_end = body.find(b"\r\n", position)
        if line_end < 0:
            raise ValueError(f"{source}: truncated chunked body")
        size = int(body[position:line_end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += body[line_end + 2: line_end + 2 + size]
        position = line_end + 2 + size + 2


def _flow_inputs(flow_file: str) -> Iterator[Input]:
    from mitmproxy import (  # only here: the DLP library itself never imports mitmproxy
        http,
    )
    from mitmproxy import io as flow_io

    with open(flow_file, "rb") as stream:
        for index, flow in enumerate(flow_io.FlowReader(stream).stream()):
            if not isinstance(flow, http.HTTPFlow):
                continue
            request = flow.request
            label = f"{flow_file}#{index} {request.method} {mask_url(request.pretty_url)}"
            yield (f"{label} request", "request", request.raw_content or b"", request.headers.get("content-type"),
                   request.headers.get("content-encoding"), (request.path, list(request.headers.items(multi=True))),
                   request.host)
            if flow.response is not None:
                response = flow.response
                yield (f"{label} response {response.status_code}", "response", response.raw_content or b"",
                       response.headers.get("content-type"), response.headers.get("content-encoding"),
                       ("/", list(response.headers.items(multi=True))), request.host)


# explain ----------------------------------------------------------------------------------------------
def explain_command(args: argparse.Namespace) -> int:
    path = Path(args.value)
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else args.value
    candidates = explain(text)
    if not candidates:
        print("no detector pattern matches anything in this text")
    for candidate in candidates:
        verdict = "MATCH" if candidate.valid else "rejected"
        print(f"{candidate.detector}: {candidate.token!r} at byte {candidate.start}: {verdict}")
        print(f"  {'✓' if candidate.whole_token else '✗'} a whole token (no letter or digit glued to it)")
        for label, ok in candidate.steps:
            print(f"  {'✓' if ok else '✗'} {label}")
    rules = _load(args.rules)
    if rules is None:
        return 2
    try:
        profile = rules.profile(args.profile)
    except KeyError as error:
        print(f"gateway dlp explain: {error.args[0]}", file=sys.stderr)
        return 2
    result = profile.scan(text.encode("utf-8"))
    print(f"profile {profile.name}: " + ("no rule triggers" if result.clean else f"action {result.action}"))
    for finding in result.findings:
        print(f"  rule {finding.rule} ({finding.action}, {finding.severity}): {finding.type} {finding.masked} "
              f"at {finding.location}")
    return 0


# test -------------------------------------------------------------------------------------------------
def test_command(args: argparse.Namespace) -> int:
    rules = _load(args.rules_dir, args.engine)
    if rules is None:
        return 2
    failures = rules.check_examples(args.engine)
    for failure in failures:
        print(f"FAIL {failure}")
    examples = sum(len(r.examples_match) + len(r.examples_no_match) for r in rules.rules.values())
    print(f"{len(rules.rules)} rules, {examples} examples: " + (f"{len(failures)} failed" if failures else "all pass"))
    return 1 if failures else 0

