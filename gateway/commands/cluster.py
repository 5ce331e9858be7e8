"""`gateway cluster ...`: the machines of one boundary vouching for each other's trace logs.

  gateway cluster peer -c CONFIG --witness URL [--management URL] [--log PATH]
      print this machine's entry for the peers file (creating its witness key)
  gateway cluster witness -c CONFIG --peers FILE [--interval S]
      the service: this machine's witness for the others' logs, and pushes of its own log to theirs

The peers file is described in gateway.trace.peers; `gateway trace verify --peers FILE` checks every
log and its cross-witness cosignatures (verify_peers_command below).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from gateway.config.load import DEFAULT_CONFIG, ConfigError, load_config
from gateway.ops.crosswitness import DEFAULT_INTERVAL, CrossWitness, CrossWitnessError, peer_entry, witness_signer
from gateway.ops.sdnotify import sd_notify
from gateway.proxy.state import trace_key_path
from gateway.trace.note import SIG_ED25519, NoteError, load_or_create_signer
from gateway.trace.peers import Peers, load_peers, verify_peers
from gateway.yamlnodes import ConfigError as PeersError


def register(subparsers: argparse._SubParsersAction) -> None:
    cluster = subparsers.add_parser("cluster", help="machines of one boundary cosigning each other's trace logs")
    sub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("peer", help="print this machine's entry for the peers file (creates its witness key)")
    _config_args(p)
    p.add_argument("--witness", required=True, metavar="URL",
                   help="where the other machines reach this machine's witness, e.g. http://10.0.0.21:7380")
    p.add_argument("--management", metavar="URL", help="this machine's management listener (doctor --peers)")
    p.add_argument("--log", metavar="PATH", help="where an auditor will find a copy of this machine's log")
    p.set_defaults(func=_peer)

    p = sub.add_parser("witness", help="witness the other machines' logs and push this one's to their witnesses")
    _config_args(p)
    p.add_argument("--peers", type=Path, required=True, help="the boundary's peers file")
    p.add_argument("--interval", type=float, default=DEFAULT_INTERVAL,
                   help="seconds between pushes of this log's checkpoint (default %(default)g)")
    p.add_argument("--listen", metavar="HOST:PORT", help="listen here instead of the peers file's witness address")
    p.set_defaults(func=_witness)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--frontend", metavar="NAME", help="front-end profile (frontends/NAME.yaml) over the config")


def _fail(message: str) -> int:
    print(f"gateway cluster: {message}", file=sys.stderr)
    return 2


def _load(args: argparse.Namespace):
    try:
        return load_config(args.config, args.frontend)
    except ConfigError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return None


def load_peers_or_print(path: Path) -> Peers | None:
    try:
        return load_peers(path)
    except PeersError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return None


def _peer(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return 2
    try:  # the log's key: the gateway creates it on its first start; the same file, made now if need be
        log_key = load_or_create_signer(trace_key_path(config.state_dir), config.trace_origin, SIG_ED25519)
        witness = witness_signer(config)
    except (OSError, NoteError, CrossWitnessError) as exc:
        return _fail(str(exc))
    sys.stdout.write(peer_entry(config, witness, log_key.verifier.vkey(), args.witness, args.management, args.log))
    return 0


def _witness(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = _load(args)
    peers = load_peers_or_print(args.peers) if config is not None else None
    if peers is None:
        return 2
    listen = None
    if args.listen:
        host, _, port = args.listen.rpartition(":")
        if not host or not port.isdigit():
            return _fail(f"--listen {args.listen!r}: expected HOST:PORT")
        listen = (host.strip("[]"), int(port))
    try:
        service = CrossWitness(config, peers, args.interval, listen)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: service.stop())
        service.run(ready=lambda: sd_notify("READY=1"))
    except CrossWitnessError as exc:
        return _fail(str(exc))
    return 0


def verify_peers_command(peers_file: Path) -> int:
    """`gateway trace verify --peers FILE`: every machine's log verifies and carries its cross-witness
    cosignatures (exit 0), else 1 naming what failed; 2 for an unreadable peers file."""
    peers = load_peers_or_print(peers_file)
    if peers is None:
        return 2
    bad = 0
    for verdict in verify_peers(peers):
        peer, report = verdict.peer, verdict.report
        if report is None:
            print(f"MISSING: {peer.name} ({peer.origin}): {verdict.problem}")
            bad += 1
            continue
        if report.problems:
            for problem in report.problems[:20]:
                print(f"TAMPERED: {peer.name} ({peer.origin}): {problem}")
            bad += 1
            continue
        for note in report.notes:
            print(f"note: {peer.name}: {note}", file=sys.stderr)
        cp, witnessed = report.checkpoint, report.witnessed
        print(f"OK: {peer.name} ({peer.origin}): {cp.size} records, root {cp.root.hex()}; "
              f"witnessed up to {witnessed.size}" + (f" ({cp.size - witnessed.size} newer records not yet "
                                                     f"cosigned)" if cp.size > witnessed.size else ""))
    if bad:
        print(f"{bad} of {len(peers.peers)} machines' logs do not verify", file=sys.stderr)
        return 1
    return 0
