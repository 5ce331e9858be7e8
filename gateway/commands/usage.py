"""`gateway usage report`: priced usage for settlement (可控可计量), from trace logs that verify.

  gateway usage report --from T --to T [--by KEYS] [--format csv|json] [-c CONFIG]
                       [--trace DIR --pubkey KEY]... [--witness KEY]... [--witness-policy FILE] [--check]
  gateway usage report ... [--peers FILE]   every machine of a boundary, cross-witnessed


Every log verifies (and, with --witness / --witness-policy, as `gateway trace verify` checks them, only
records under a checkpoint its witnesses cosigned count) before any figure is summed. `--peers FILE`
sums every machine's log named in the peers file (gateway.trace.peers), each verified with its log key
from that file and counted only up to the checkpoint the other machines' witnesses cosigned. The report's
SHA-256, the logs it covered (size and root of each) and its totals are appended to the configuration's
trace log as a settlement record. `--check` makes no new report: it finds the newest settlement record
for the same range, grouping, format and logs, recounts exactly the records it covered (the logs must
still hold them: their roots at the settled sizes) and says EQUAL (the same report, byte for byte) or
DIFFERS and where (which log no longer holds what was settled, which totals differ), and what records
of the range came into the logs after it.

Exit status: 0 done (--check: equal), 1 refused (a log that does not verify; --check: differs, or no
settlement record), 2 usage or I/O errors.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.authz.settlement import KEYS, MEASURES, Settlement
from gateway.commands import Refused, Usage, configuration
from gateway.commands.consent import guard
from gateway.commands.trace import _policy, _witness_args
from gateway.config.load import DEFAULT_CONFIG, ConfigError
from gateway.proxy.state import trace_key_path, trace_verifier_key_path, writer_socket_path
from gateway.trace import TraceError, TraceLog
from gateway.trace.audit import WitnessPolicy, iter_committed_entries, verify_log
from gateway.trace.log import VERIFIER_KEY_FILE
from gateway.trace.merkle import ProofError
from gateway.trace.note import Checkpoint, NoteError, Verifier, parse_vkey
from gateway.trace.peers import load_peers
from gateway.trace.remote import RemoteTraceLog
from gateway.transfer.model import utc_timestamp


def register(subparsers: argparse._SubParsersAction) -> None:
    usage = subparsers.add_parser("usage", help="settlement: priced usage from verified trace logs")
    usage_sub = usage.add_subparsers(dest="usage_command", required=True, metavar="SUBCOMMAND")
    p = usage_sub.add_parser("report", help="verify the logs, sum and price their usage, and append the "
                                            "report's SHA-256 and totals to the trace log")
    p.add_argument("--from", dest="start", required=True, help="ISO 8601 date or time, inclusive (UTC if no zone)")
    p.add_argument("--to", dest="end", required=True, help="ISO 8601 date or time, exclusive")
    p.add_argument("--by", default="consumer,dataset", help=f"grouping keys from: {', '.join(KEYS)} (%(default)s)")
    p.add_argument("--format", choices=("json", "csv"), default="json")
    p.add_argument("--trace", type=Path, action="append", default=[], metavar="DIR",
                   help="a trace log to sum (repeatable; default: the configuration's)")
    p.add_argument("--pubkey", type=Path, action="append", default=[], metavar="KEY",
                   help="each --trace log's verifier key, in order: required with --trace (a log's own "
                        f"{VERIFIER_KEY_FILE} proves nothing: whoever forged the log wrote it); the configuration's "
                        "own log defaults to the gateway's key beside its signing key in the state folder")
    _witness_args(p)
    p.add_argument("--peers", type=Path, metavar="FILE",
                   help="instead of --trace: every machine's log in this peers file, each verified with its key "
                        "and its cross-witness cosignatures (gateway.trace.peers)")
    p.add_argument("-o", "--output", type=Path, help="write the report here (default: standard output)")
    p.add_argument("--no-record", action="store_true", help="do not append the settlement record")
    p.add_argument("--check", action="store_true",
                   help="check the settlement record appended earlier for this range instead of making a report")
    p.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--frontend", metavar="NAME")
    p.set_defaults(func=guard(_report))


@dataclass
class Log:
    directory: Path
    checkpoint: Checkpoint  # the newest the log's key signed (and the witness policy accepts)
    covered: dict[str, Any]  # how the report names it


def _when(text: str, what: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise Usage(f"{what}: {text!r} is not an ISO 8601 date or time") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _key(key_file: Path) -> Verifier:
    try:
        return parse_vkey(key_file.read_text().strip())
    except NoteError as e:
        raise Usage(f"{key_file}: {e}") from None


def _verified(directory: Path, verifier: Verifier, key_from: str, policy: WitnessPolicy | None) -> Log:
    print(f"{directory}: checking against {verifier.vkey()} (from {key_from})", file=sys.stderr)
    verified = verify_log(directory, verifier, policy)
    if verified.problems:  # every log verifies before any figure is summed
        raise Refused(f"{directory} does not verify, no figures: " + "; ".join(verified.problems[:5]))
    print(f"{directory}: verified", file=sys.stderr)
    checkpoint = verified.witnessed if policy is not None else verified.checkpoint
    covered = {"log": checkpoint.origin, "size": checkpoint.size, "root": checkpoint.root.hex(),
               "verifier_key": verifier.vkey(), "key_from": key_from}
    if policy is not None:
        covered["witnessed"] = sorted(w.name for w in policy.witnesses)
    return Log(directory, checkpoint, covered)


def _records(log: Log, checkpoint: Checkpoint) -> Iterator[tuple[int, dict]]:
    try:
        for position, entry in iter_committed_entries(log.directory, checkpoint):
            yield position, json.loads(entry)
    except (ProofError, ValueError) as e:
        raise Refused(f"{log.directory}: changed since it verified: {e}") from None


def _count(settlement: Settlement, log: Log, checkpoint: Checkpoint, start: datetime, end: datetime,
           after: int = 0) -> None:
    """Add the records of the range among `checkpoint`'s, from position `after` on."""
    for position, record in _records(log, checkpoint):
        when = record.get("time")
        if position >= after and isinstance(when, str) and start <= _when(when, f"record {position} time") < end:
            settlement.add(record)


def _render(settlement: Settlement, start: datetime, end: datetime, covered: list[dict], form: str) -> str:
    if form == "csv":
        out = io.StringIO()
        columns = [*settlement.keys, *MEASURES, "amount", "currency"]
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for row in settlement.table():
            writer.writerow(["" if row[c] is None else row[c] for c in columns])
        return out.getvalue()
    # Each log's keys in one order, as the trace log keeps them: a recount gives the same bytes.
    logs = [dict(sorted(c.items())) for c in covered]
    report = {"from": start.isoformat(), "to": end.isoformat(), "by": list(settlement.keys), "logs": logs,
              "groups": settlement.table(), "totals": settlement.totals()}
    return json.dumps(report, ensure_ascii=False, indent=2) + "\n"


def _report(args: argparse.Namespace) -> int:
    config = configuration(args)
    if config.authz is None:
        raise Usage(f"{config.source}: no authz section (the catalogue prices the usage)")
    start, end = _when(args.start, "--from"), _when(args.end, "--to")
    keys = tuple(k.strip() for k in args.by.split(",") if k.strip())

    def settlement() -> Settlement:
        return Settlement(config.authz.catalog, keys)
    try:
        settlement()
    except ValueError as e:
        raise Usage(f"--by: {e}") from None
    policy = _policy(args)
    own_key = trace_verifier_key_path(config.state_dir)  # never the copy inside a log: its forger wrote it
    logs = _peer_logs(args) if args.peers is not None else _given_logs(args, config.trace_dir, own_key, policy)
    origins = [log.checkpoint.origin for log in logs]
    if len(set(origins)) != len(origins):
        raise Refused(f"origin {next(o for o in origins if origins.count(o) > 1)} given twice (a log summed twice)")
    if args.check:
        own = next((log for log in logs if log.directory == config.trace_dir), None) or _verified(
            config.trace_dir, _key(own_key), str(own_key), policy)
        return _check(args, logs, own, settlement, start, end)
    counted = settlement()
    for log in logs:
        _count(counted, log, log.checkpoint, start, end)
    text = _render(counted, start, end, [log.covered for log in logs], args.format)
    if not counted.rows:  # (still a statement worth settling: no billable use in the range)
        print(f"note: no billable transfer from {start.isoformat()} to {end.isoformat()} in the logs "
              f"({', '.join(origins)})", file=sys.stderr)
    if counted.unbilled["requests"]:
        print(f"note: {counted.unbilled['requests']} allowed answer(s) outside 2xx carried "
              f"{counted.unbilled['records']} record(s) out, not billed (the provider answered them as failed)",
              file=sys.stderr)
    digest = hashlib.sha256(text.encode()).hexdigest()
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    if args.no_record:
        return 0
    record = {"v": 1, "type": "settlement", "id": f"settlement-{uuid.uuid4()}", "time": utc_timestamp(),
              "frontend": config.name, "report_sha256": digest, "format": args.format,
              "from": start.isoformat(), "to": end.isoformat(), "by": list(keys),
              "logs": [log.covered for log in logs], "totals": counted.totals()}
    index = _append(config, record)
    print(f"settlement record {record['id']} (report sha256 {digest}) appended as record {index}", file=sys.stderr)
    return 0


def _given_logs(args: argparse.Namespace, own_log: Path, own_key: Path, policy: WitnessPolicy | None) -> list[Log]:
    directories = args.trace or [own_log]
    key_files = args.pubkey or ([] if args.trace else [own_key])
    if len(key_files) != len(directories):
        raise Usage("give one --pubkey per --trace, in order: a log is checked against a key you trust, "
                    f"never the {VERIFIER_KEY_FILE} inside it")
    for directory, key_file in zip(directories, key_files):
        if key_file.resolve().is_relative_to(directory.resolve()):
            raise Usage(f"--pubkey {key_file} is inside the log it is to check ({directory}): whoever could "
                        "rewrite the log could rewrite that key too; give the key obtained out of band")
    return [_verified(directory, _key(key_file), str(key_file), policy)
            for directory, key_file in zip(directories, key_files)]


def _peer_logs(args: argparse.Namespace) -> list[Log]:
    """Every machine's log of the peers file, with its log key and its cross-witness policy from there."""
    if args.trace or args.pubkey or args.witness or args.witness_policy:
        raise Usage("--peers names every log, its key and its witnesses: no --trace, --pubkey or --witness")
    try:
        logs = load_peers(args.peers).logs()
    except ConfigError as e:
        raise Usage("\n".join(e.errors)) from None
    except ValueError as e:
        raise Usage(str(e)) from None
    return [_verified(log, peer.log_key, f"{args.peers} ({peer.name})", policy) for peer, log, policy in logs]


def _check(args: argparse.Namespace, logs: list[Log], own: Log, settlement: Callable[[], Settlement],
           start: datetime, end: datetime) -> int:
    """Recount what the newest settlement record for this range covered, and compare."""
    wanted = {"from": start.isoformat(), "to": end.isoformat(), "by": list(settlement().keys), "format": args.format}
    origins = sorted(log.checkpoint.origin for log in logs)
    found = [(position, record) for position, record in _records(own, own.checkpoint)
             if record.get("type") == "settlement" and all(record.get(k) == v for k, v in wanted.items())
             and sorted(str(c.get("log")) for c in record.get("logs", [])) == origins]
    if not found:
        raise Refused(f"no settlement record in {own.directory} for {wanted['from']} to {wanted['to']}, by "
                      f"{','.join(wanted['by'])}, {args.format}, logs {', '.join(origins)}")
    position, settled = found[-1]
    print(f"settlement record {settled.get('id')} (record {position} of {own.checkpoint.origin}, "
          f"{settled.get('time')}): report sha256 {settled.get('report_sha256')}")
    differences = []
    recount, later = settlement(), settlement()
    for log in logs:
        entry = next(c for c in settled["logs"] if c.get("log") == log.checkpoint.origin)
        try:
            at_settlement = Checkpoint(log.checkpoint.origin, int(entry["size"]), bytes.fromhex(entry["root"]))
        except (KeyError, TypeError, ValueError):
            differences.append(f"{log.checkpoint.origin}: the settlement record names no size and root")
            continue
        if at_settlement.size > log.checkpoint.size:
            differences.append(f"{log.checkpoint.origin}: settled over {at_settlement.size} records, the log now "
                               f"holds {log.checkpoint.size}: records removed")
            continue
        try:
            _count(recount, log, at_settlement, start, end)
        except Refused:
            differences.append(f"{log.checkpoint.origin}: no longer holds the {at_settlement.size} records settled "
                               "(their root differs): the log was rewritten")
            continue
        _count(later, log, log.checkpoint, start, end, after=at_settlement.size)
        if entry.get("verifier_key") != log.covered["verifier_key"]:
            print(f"note: {log.checkpoint.origin} verified with another key than at the settlement")
    if not differences:
        text = _render(recount, start, end, settled["logs"], args.format)
        settled_totals = settled.get("totals") or {}
        differences = [f"totals: {measure} settled {_figure(settled_totals.get(measure))}, recounted {_figure(value)}"
                       for measure, value in recount.totals().items() if settled_totals.get(measure) != value]
        if hashlib.sha256(text.encode()).hexdigest() == settled.get("report_sha256"):
            print("EQUAL: the records settled give the same report, byte for byte")
        elif not differences:
            differences.append("the totals agree, the report's groups or prices do not (the catalogue changed?)")
    if later.rows:
        extra = later.totals()
        print(f"since the settlement: {extra['requests']} request(s) of the range came into the logs, "
              f"{extra['records']} record(s), {extra['bytes']} bytes, amount {_figure(extra['amount'])} (not settled)")
    for difference in differences:
        print(f"DIFFERS: {difference}")
    return 1 if differences else 0


def _figure(value: object) -> str:
    """A total as the report's reader writes it: an amount per currency as `120.0 CNY`, none as 0."""
    if isinstance(value, dict):
        return ", ".join(f"{amount} {currency}" for currency, amount in value.items()) or "0"
    return "none" if value is None else str(value)


def _append(config, record: dict[str, Any]) -> int:
    """Through the running gateway's trace writer when there is one, else into the log directly."""
    socket_path = writer_socket_path(config.state_dir)
    try:
        if socket_path.exists():
            with RemoteTraceLog.connect(socket_path) as log:
                return log.append_sync(record)
        with TraceLog.open(config.trace_dir, origin=config.trace_origin,
                           signing_key=trace_key_path(config.state_dir)) as log:
            return log.append_sync(record)
    except TraceError as e:
        raise Refused(f"the report was written, its settlement record not appended: {e}") from None
