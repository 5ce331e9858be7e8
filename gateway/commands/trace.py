"""`gateway trace ...`: audit a trace log offline (witness cosignatures are checked by --witness).

The log is named as DIR (a copy handed to an auditor: its key with --pubkey, else DIR's own copy)
or as the gateway's configuration, `-c CONFIG` (its trace.dir and, beside the signing key in its
state_dir, the verifier key); with neither, the default configuration, as `gateway run` uses it.

Longer than 400 lines: nine subcommands, each of which only parses its arguments and prints;
the work is done in gateway.trace.

Exit status: 0 intact / valid, 1 tampering or an invalid proof (the message names the first bad
record or file), 2 usage or I/O errors.
"""

import argparse
import csv
import json
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from gateway.commands import Usage, configuration, evidence
from gateway.config.load import DEFAULT_CONFIG, FRONTENDS_DIR
from gateway.proxy.state import trace_verifier_key_path
from gateway.trace.abandoned import unfinished
from gateway.trace.audit import (
    AuditIOError,
    WitnessPolicy,
    check_inclusion_proof,
    iter_committed_entries,
    iter_entries,
    latest_record,
    newest_checkpoint,
    prove_consistency,
    prove_inclusion,
    verify_log,
)
from gateway.trace.merkle import ProofError
from gateway.trace.meter import DEFAULT_KEYS, KEYS, Meter
from gateway.trace.note import NoteError, Verifier, parse_vkey
from gateway.trace.log import VERIFIER_KEY_FILE
from gateway.trace.tiles import TileError

EXIT_OK, EXIT_BAD, EXIT_USAGE = 0, 1, 2


class BadRecord(Exception):
    """A record that is not what the log's writer wrote (exit 1)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    trace = subparsers.add_parser("trace", help="verify, search and prove the trace log")
    sub = trace.add_subparsers(dest="trace_command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("verify", help="recompute the whole log; exit 1 naming the first bad record or file")
    _dir_and_key(p)
    _witness_args(p)
    _peers_arg(p, "verify every machine's log (its `log` copy) and its cross-witness cosignatures instead of DIR")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("show", help="list records as JSON lines")
    _dir_and_key(p)
    p.add_argument("--id", help="transfer id")
    p.add_argument("--open", action="store_true",
                   help="only open records without a completion (transfers in flight, or cut by a crash)")
    _record_filters(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("meter", help="usage for settlement: transfers and bytes by zones, decision, ..., "
                                     "from a log that verifies, naming the checkpoint they cover")
    _dir_and_key(p)
    _witness_args(p)
    _peers_arg(p, "sum every machine's log instead of DIR, each verified with its key and cross-witnesses first")
    _record_filters(p)
    p.add_argument("--by", default=",".join(DEFAULT_KEYS),
                   help=f"grouping keys, comma-separated, from: {', '.join(KEYS)} (default: %(default)s)")
    p.add_argument("--format", choices=("json", "csv"), default="json")
    p.set_defaults(func=cmd_meter, id=None)

    p = sub.add_parser("prove", help="inclusion proof (C2SP tlog-proof) of a transfer against the latest checkpoint")
    _dir_and_key(p)
    p.add_argument("transfer_id")
    p.add_argument("-o", "--output", type=Path, help="write the proof here instead of stdout")
    p.set_defaults(func=cmd_prove)

    p = sub.add_parser("check-proof", help="check an inclusion proof offline")
    p.add_argument("proof", type=Path)
    _proof_key_args(p)
    p.set_defaults(func=cmd_check_proof)

    p = sub.add_parser("evidence", help="one transfer's record, inclusion proof and signed (cosigned) checkpoint "
                                        "in one file, for offline checking")
    _dir_and_key(p)
    p.add_argument("transfer_id")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.set_defaults(func=cmd_evidence)

    p = sub.add_parser("check-evidence", help="verify an evidence file offline; exit 1 when it does not hold")
    p.add_argument("evidence", type=Path)
    _proof_key_args(p)
    p.set_defaults(func=cmd_check_evidence)

    p = sub.add_parser("consistency", help="prove the log extends an older checkpoint")
    _dir_and_key(p)
    p.add_argument("old_checkpoint", type=Path)
    p.set_defaults(func=cmd_consistency)

    p = sub.add_parser("witness", help="run a C2SP tlog-witness cosigning the checkpoints of the given logs")
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
    p.add_argument("--key", type=Path, required=True,
                   help="witness signer key file (created with --name if missing, mode 0600)")
    p.add_argument("--name", help="witness name, when the key is created")
    p.add_argument("--log", action="append", default=[], required=True, metavar="ORIGIN=VKEY",
                   help="a log to witness: its origin and verifier key (or key file); repeatable")
    p.add_argument("--state", type=Path, required=True, help="directory for the latest cosigned size per log")
    p.set_defaults(func=cmd_witness)

    p = sub.add_parser("witness-push", help="push the log's newest checkpoint to a witness and store its cosignature")
    _dir_and_key(p)
    p.add_argument("url", help="the witness's submission prefix, e.g. http://127.0.0.1:7380")
    p.add_argument("--witness-key", required=True, help="the witness's verifier key (or key file)")
    p.set_defaults(func=cmd_witness_push)


def _dir_and_key(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path, metavar="DIR", nargs="?",
                   help="the trace log directory (default: trace.dir of the configuration)")
    _config_args(p, "find the log and its key in this gateway configuration instead of DIR")
    p.add_argument("--pubkey", type=Path,
                   help=f"the log's verifier key file (default: STATE_DIR/{VERIFIER_KEY_FILE} of the configuration, "
                        f"or DIR/{VERIFIER_KEY_FILE}; a key on the same machine proves self-consistency only)")


def _proof_key_args(p: argparse.ArgumentParser) -> None:
    """The keys a proof checked offline is checked with: the log's, and the witnesses' asked for."""
    _config_args(p, "find the log's verifier key in this gateway configuration instead of --pubkey")
    p.add_argument("--pubkey", type=Path, help=f"the log's verifier key file (default: STATE_DIR/{VERIFIER_KEY_FILE} "
                                               f"of the configuration)")
    _witness_args(p)


def _config_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("-c", "--config", type=Path, help=f"{what} (default: {DEFAULT_CONFIG})")
    p.add_argument("--frontend", metavar="NAME",
                   help=f"with the configuration: layer the front-end profile {FRONTENDS_DIR}/NAME.yaml over it")


def _locate_log(args: argparse.Namespace) -> None:
    """Set args.directory and args.default_pubkey from DIR or the configuration; a folder that is
    not a trace log is a usage error saying what was expected."""
    if args.directory is not None and args.config is not None:
        raise Usage("name the log either as DIR or with -c CONFIG, not both")
    if args.directory is None:
        config = configuration(args)
        args.directory = config.trace_dir
        args.default_pubkey = trace_verifier_key_path(config.state_dir)
        where = f"trace.dir of {args.config or DEFAULT_CONFIG}"
    else:
        args.default_pubkey = args.directory / VERIFIER_KEY_FILE
        where = "DIR"
    if not args.directory.is_dir():
        raise Usage(f"{args.directory} ({where}): not a directory")
    if not (args.directory / "checkpoint").exists() and not (args.directory / "journal").exists():
        inside = sorted(found.parent.name for found in args.directory.glob("*/checkpoint"))
        hint = (f"; it holds one in {', '.join(f'{name}/' for name in inside)}" if inside else
                "; the gateway keeps it in trace.dir, by default STATE_DIR/trace")
        raise Usage(f"{args.directory} ({where}): not a trace log directory: expected its 'checkpoint' "
                         f"and 'journal' files (tlog-tiles, with tile/){hint}")


def _peers_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--peers", type=Path, metavar="FILE",
                   help=f"the boundary's peers file (gateway.trace.peers): {what}")


def _record_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", help="ISO 8601 time, inclusive")
    p.add_argument("--until", help="ISO 8601 time, exclusive")
    p.add_argument("--zone", help="client or upstream zone")
    p.add_argument("--rule", help="a matched rule name")


def _witness_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--witness", action="append", default=[], metavar="KEY",
                   help="require a cosignature by this witness verifier key (or file); repeatable")
    p.add_argument("--witness-policy", type=Path,
                   help="policy file: lines 'witness KEY' and optionally 'quorum N' (default: all)")


def _load_vkey(value: str | Path) -> Verifier:
    path = Path(value)
    try:
        text = path.read_text() if path.exists() else str(value)
        return parse_vkey(text.strip().splitlines()[0] if text.strip() else "")
    except (OSError, NoteError) as exc:
        if not path.exists():  # more likely a mistyped key file than a mistyped key
            raise Usage(f"{value}: no such file (nor a verifier key: {exc})") from None
        raise Usage(f"{value}: {exc}") from None


def _log_verifier(args: argparse.Namespace) -> Verifier:
    if args.pubkey is not None:
        return _load_vkey(args.pubkey)
    default = args.default_pubkey
    if not default.exists():
        raise Usage(f"no --pubkey given and {default} does not exist")
    print(f"note: checking against {default}; pass --pubkey with a key obtained out of band", file=sys.stderr)
    return _load_vkey(default)


def _policy(args: argparse.Namespace) -> WitnessPolicy | None:
    witnesses = [_load_vkey(w) for w in args.witness]
    quorum = None
    if args.witness_policy is not None:
        try:
            lines = args.witness_policy.read_text().splitlines()
        except OSError as exc:
            raise Usage(f"{args.witness_policy}: {exc.strerror}") from None
        for number, line in enumerate(lines, start=1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            if words[0] == "witness" and len(words) == 2:
                witnesses.append(_load_vkey(words[1]))
            elif words[0] == "quorum" and len(words) == 2 and words[1].isdigit():
                quorum = int(words[1])
            else:
                raise Usage(f"{args.witness_policy}:{number}: expected 'witness KEY' or 'quorum N'")
    if not witnesses:
        return None
    quorum = len(witnesses) if quorum is None else quorum
    if not 1 <= quorum <= len(witnesses):
        raise Usage(f"quorum {quorum} must be between 1 and {len(witnesses)}")
    return WitnessPolicy(witnesses, quorum)


def _guard(func):
    def run(args: argparse.Namespace) -> int:
        try:
            if hasattr(args, "directory") and getattr(args, "peers", None) is None:  # a command reading one log
                _locate_log(args)
            return func(args)
        except Usage as exc:
            print(f"gateway trace: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except BadRecord as exc:
            print(f"gateway trace: {exc}", file=sys.stderr)
            return EXIT_BAD
        except BrokenPipeError:
            raise  # the command line ends quietly when it is stdout (gateway.cli)
        except (AuditIOError, OSError) as exc:
            print(f"gateway trace: {exc}", file=sys.stderr)
            return EXIT_USAGE
    run.__name__ = func.__name__
    return run


@_guard
def cmd_verify(args: argparse.Namespace) -> int:
    if args.peers is not None:
        _peers_alone(args)
        from gateway.commands.cluster import verify_peers_command
        return verify_peers_command(args.peers)
    verifier, policy = _log_verifier(args), _policy(args)
    report = verify_log(args.directory, verifier, policy)
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    if report.problems:
        for problem in report.problems[:20]:
            print(f"TAMPERED: {problem}")
        return EXIT_BAD
    cp = report.checkpoint
    print(f"OK: {cp.size} records, root {cp.root.hex()}, checkpoint signed by {verifier.name}")
    try:
        still_open = unfinished(_records(iter_committed_entries(args.directory, cp)))
    except ProofError as exc:  # the files changed since they were verified
        print(f"TAMPERED: {exc}")
        return EXIT_BAD
    if still_open:  # not tampering: in flight while the log was read, or cut by a crash
        first = still_open[0][1].get("id")
        print(f"warning: {len(still_open)} transfers are open (forwarded, no completion record), the first "
              f"{first}; list them with 'gateway trace show {args.directory} --open'", file=sys.stderr)
    return EXIT_OK


def _parse_time(text: str, what: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise Usage(f"{what}: {text!r} is not an ISO 8601 time") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _matches(record: dict, args: argparse.Namespace, since, until) -> bool:
    if args.id is not None and record.get("id") != args.id:
        return False
    if since or until:
        try:
            when = _parse_time(str(record.get("time")), "record time")
        except Usage:
            return False
        if (since and when < since) or (until and when >= until):
            return False
    if args.zone is not None:
        zones = {(record.get(side) or {}).get("zone") for side in ("client", "upstream")
                 if isinstance(record.get(side), dict)}
        if args.zone not in zones:
            return False
    if args.rule is not None:
        rules = record.get("rules") or []
        if not any(isinstance(r, dict) and r.get("rule") == args.rule for r in rules):
            return False
    return True


def _checkpoint_size(args: argparse.Namespace) -> int:
    try:
        verifier = _load_vkey(args.pubkey) if args.pubkey is not None else None
        return newest_checkpoint(args.directory, verifier)[1].size
    except NoteError as exc:
        raise Usage(f"{args.directory / 'checkpoint'}: {exc}") from None


@_guard
def cmd_show(args: argparse.Namespace) -> int:
    window = _window(args)
    records = _records(iter_entries(args.directory, _checkpoint_size(args)))
    for index, record in unfinished(records) if args.open else records:
        if _matches(record, args, *window):
            sys.stdout.write(json.dumps({"index": index, "record": record}, ensure_ascii=False) + "\n")
    return EXIT_OK


def _window(args: argparse.Namespace) -> tuple[datetime | None, datetime | None]:
    return (_parse_time(args.since, "--since") if args.since else None,
            _parse_time(args.until, "--until") if args.until else None)


def _records(entries: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, dict]]:
    """(index, record) of each (index, entry)."""
    for index, entry in entries:
        try:
            yield index, json.loads(entry)
        except ValueError:
            raise BadRecord(f"record {index}: not JSON (run 'gateway trace verify')") from None


@_guard
def cmd_meter(args: argparse.Namespace) -> int:
    try:
        meter = Meter(tuple(key.strip() for key in args.by.split(",") if key.strip()))
    except ValueError as exc:
        raise Usage(f"--by: {exc}") from None
    window = _window(args)
    logs = _meter_logs(args)
    anchors, checkpoints = [], []
    for directory, verifier, policy, key_from in logs:  # every log verifies before any figure is summed
        report = verify_log(directory, verifier, policy)
        if report.problems:  # figures from a log that does not verify would settle nothing
            for problem in report.problems[:20]:
                print(f"TAMPERED: {directory}: {problem}" if args.peers else f"TAMPERED: {problem}")
            return EXIT_BAD
        checkpoint = report.witnessed if policy is not None else report.checkpoint
        checkpoints.append(checkpoint)
        anchors.append({"log": checkpoint.origin, "checkpoint": {"size": checkpoint.size,
                                                                  "root": checkpoint.root.hex()},
                        "verifier_key": verifier.vkey(), "key_from": key_from, "witnessed": policy is not None})
    for (directory, *_), checkpoint in zip(logs, checkpoints):
        try:
            for _, record in _records(iter_committed_entries(directory, checkpoint)):
                meter.add(record, counted=_matches(record, args, *window))
        except ProofError as exc:  # the files changed since they were verified
            print(f"TAMPERED: {directory}: {exc}" if args.peers else f"TAMPERED: {exc}")
            return EXIT_BAD
        meter.finish()  # a log's open records without their completion count now: ids are per machine
    covers = {"logs": anchors} if args.peers else anchors[0]
    if args.format == "csv":
        print(f"meter: covers {json.dumps(covers, ensure_ascii=False)}", file=sys.stderr)
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(meter.columns)
        for row in meter.table():
            writer.writerow(["" if row[column] is None else row[column] for column in meter.columns])
        return EXIT_OK
    print(json.dumps({
        **covers,
        "filters": {name: getattr(args, name) for name in ("since", "until", "zone", "rule")
                    if getattr(args, name) is not None},
        "by": list(meter.keys), "groups": meter.table(), "total": meter.total.as_dict(),
    }, ensure_ascii=False, indent=2))
    return EXIT_OK


def _peers_alone(args: argparse.Namespace) -> None:
    if (args.directory is not None or args.config is not None or args.pubkey is not None or args.witness
            or args.witness_policy is not None):
        raise Usage("--peers names every log, its key and its witnesses: no DIR, -c, --pubkey or --witness")


def _meter_logs(args: argparse.Namespace) -> list[tuple[Path, Verifier, WitnessPolicy | None, str]]:
    """(directory, verifier, witness policy, where the key came from) of each log to sum."""
    if args.peers is None:
        return [(args.directory, _log_verifier(args), _policy(args),
                 str(args.pubkey) if args.pubkey is not None
                 else f"{args.default_pubkey} (on the log's machine: self-consistency only)")]
    _peers_alone(args)
    from gateway.commands.cluster import load_peers_or_print
    peers = load_peers_or_print(args.peers)
    if peers is None:
        raise Usage(f"{args.peers}: not a valid peers file")
    try:
        return [(log, peer.log_key, policy, f"{args.peers} ({peer.name})") for peer, log, policy in peers.logs()]
    except ValueError as exc:
        raise Usage(str(exc)) from None


@_guard
def cmd_prove(args: argparse.Namespace) -> int:
    verifier = _log_verifier(args)
    try:
        _, checkpoint = newest_checkpoint(args.directory, verifier)
    except NoteError as exc:
        print(f"TAMPERED: checkpoint: {exc}")
        return EXIT_BAD
    found = latest_record(args.directory, checkpoint.size, args.transfer_id)
    if found is None:
        print(f"gateway trace: transfer {args.transfer_id} is not in the log "
              f"(checkpoint of {checkpoint.size} records)", file=sys.stderr)
        return EXIT_BAD
    try:
        text = prove_inclusion(args.directory, verifier, *found)
    except (ProofError, TileError) as exc:
        print(f"TAMPERED: cannot prove record {found[0]}: {exc} (run 'gateway trace verify')")
        return EXIT_BAD
    if args.output:
        args.output.write_text(text)
        print(f"proof of record {found[0]} against checkpoint {checkpoint.size} written to {args.output}",
              file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


@_guard
def cmd_evidence(args: argparse.Namespace) -> int:
    return evidence.write(args.directory, _log_verifier(args), args.transfer_id, args.output)


@_guard
def cmd_check_evidence(args: argparse.Namespace) -> int:
    return evidence.check(args.evidence, *_proof_keys(args))


def _proof_keys(args: argparse.Namespace) -> tuple[Verifier, WitnessPolicy | None]:
    """The log's key (--pubkey, or the configuration's) and the witness policy of a proof checked offline."""
    if args.pubkey is not None and args.config is not None:
        raise Usage("give the key either with --pubkey or with -c CONFIG, not both")
    if args.pubkey is not None:
        return _load_vkey(args.pubkey), _policy(args)
    config = configuration(args)
    pubkey = trace_verifier_key_path(config.state_dir)
    print(f"note: checking against {pubkey} (the gateway of {config.source}); a party checking offline passes "
          "--pubkey with the key obtained out of band", file=sys.stderr)
    return _load_vkey(pubkey), _policy(args)


@_guard
def cmd_check_proof(args: argparse.Namespace) -> int:
    verifier, policy = _proof_keys(args)
    try:
        index, record, checkpoint = check_inclusion_proof(args.proof.read_bytes().decode(), verifier, policy)
    except (ProofError, NoteError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        print(f"INVALID: {exc}")
        return EXIT_BAD
    print(json.dumps({"valid": True, "index": index, "tree_size": checkpoint.size, "record": record},
                     ensure_ascii=False))
    return EXIT_OK


@_guard
def cmd_consistency(args: argparse.Namespace) -> int:
    verifier = _log_verifier(args)
    old = args.old_checkpoint.read_bytes()
    try:
        result = prove_consistency(args.directory, verifier, old)
    except (ProofError, NoteError, TileError) as exc:
        print(f"INCONSISTENT: {exc}")
        return EXIT_BAD
    print(json.dumps(result))
    return EXIT_OK


@_guard
def cmd_witness(args: argparse.Namespace) -> int:
    from gateway.trace.note import SIG_COSIGNATURE_V1, load_or_create_signer, parse_skey
    from gateway.trace.witness import WitnessState, serve
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise Usage(f"--listen {args.listen!r}: expected HOST:PORT")
    try:
        if args.key.exists():
            signer = parse_skey(args.key.read_text())
        elif args.name:
            signer = load_or_create_signer(args.key, args.name, SIG_COSIGNATURE_V1)
        else:
            raise Usage(f"{args.key} does not exist: pass --name to create it")
    except NoteError as exc:
        raise Usage(f"{args.key}: {exc}") from None
    if signer.sig_type != SIG_COSIGNATURE_V1:
        raise Usage(f"{args.key}: not a cosignature (type 0x04) key")
    logs = {}
    for item in args.log:
        origin, sep, key = item.partition("=")
        if not sep:
            raise Usage(f"--log {item!r}: expected ORIGIN=VKEY")
        verifier = _load_vkey(key)
        if verifier.name != origin:
            raise Usage(f"--log {item!r}: the key is for {verifier.name!r}")
        logs[origin] = verifier
    server = serve((host, int(port)), WitnessState(args.state, logs, signer))
    print(f"witness {signer.verifier.vkey()} listening on {host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return EXIT_OK


@_guard
def cmd_witness_push(args: argparse.Namespace) -> int:
    from gateway.trace.witness import PushError, WitnessConfig, push_checkpoint
    verifier = _log_verifier(args)
    witness_key = _load_vkey(args.witness_key).vkey()
    try:
        lines = push_checkpoint(args.directory, verifier, WitnessConfig(args.url, witness_key))
    except (PushError, ProofError, TileError) as exc:
        print(f"REFUSED: {exc}")
        return EXIT_BAD
    except NoteError as exc:
        print(f"REFUSED: witness answer: {exc}")
        return EXIT_BAD
    sys.stdout.write(lines)
    return EXIT_OK
