"""Operator commands for the boundary host: `gateway lab`, `gateway doctor`, `gateway sentinel`.

The main CLI calls `register(subparsers)`; `python -m gateway.commands.ops ...` runs them alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gateway.config.load import REPO_ROOT, ConfigError, load_config

DEFAULT_LAB_CONFIG = REPO_ROOT / "config" / "lab.yaml"
DEFAULT_LAB_STATE = REPO_ROOT / "state" / "lab"


def register(subparsers: argparse._SubParsersAction) -> None:
    lab = subparsers.add_parser("lab", help="three-zone namespace lab on this machine (root)")
    lab.add_argument("action", choices=["up", "down", "status"])
    lab.add_argument("--prefix", default="gwlab", help="namespace name prefix (default: gwlab)")
    lab.add_argument("-c", "--config", type=Path, default=DEFAULT_LAB_CONFIG,
                     help="gateway configuration for the lab (default: config/lab.yaml)")
    lab.add_argument("--state-dir", type=Path, default=DEFAULT_LAB_STATE,
                     help="pid and log files (default: state/lab; state/lab-PREFIX for a cluster)")
    lab.add_argument("--gateways", type=int, help="a cluster: this many gateway machines behind two balancers "
                     "(prefix default gwc; docs/scale.md)")
    lab.add_argument("--balancer", choices=["haproxy"], default="haproxy",
                     help="the cluster's balancer: HAProxy with keepalived (the only one)")
    lab.set_defaults(func=lab_command)

    doctor = subparsers.add_parser("doctor", help="check this host's network posture against the zones")
    doctor.add_argument("-c", "--config", type=Path, required=True)
    doctor.add_argument("--frontend", help="front-end profile (frontends/NAME.yaml) over the config")
    doctor.add_argument("--peers", type=Path, metavar="FILE",
                        help="instead: check that every machine in this peers file serves this configuration's "
                             "digest, catalogue version and gateway version (on its management listener)")
    doctor.set_defaults(func=doctor_command)

    drain = subparsers.add_parser("drain", help="take this machine out of a balanced boundary: not ready, "
                                  "finish transfers, stop (SIGTERM to the gateway on the management address)")
    drain.add_argument("-c", "--config", type=Path, required=True)
    drain.add_argument("--frontend", help="front-end profile (frontends/NAME.yaml) over the config")
    drain.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the stop (default 60)")
    drain.set_defaults(func=drain_command)

    sentinel = subparsers.add_parser("sentinel", help="watch zone interfaces for traffic bypassing the gateway")
    sentinel.add_argument("-c", "--config", type=Path, required=True)
    sentinel.add_argument("--frontend", help="front-end profile (frontends/NAME.yaml) over the config")
    sentinel.add_argument("--metrics", default="127.0.0.1:9091",
                          help="HOST:PORT for the sentinel's own /metrics (default 127.0.0.1:9091; 'off' for none)")
    sentinel.add_argument("--alerts", type=Path, help="alert JSON lines file (default: the config's alerts.file)")
    sentinel.set_defaults(func=sentinel_command)


def lab_command(args: argparse.Namespace) -> int:
    from gateway.ops.lab import (
        Lab,
        LabError,
        lab_down,
        lab_status,
        lab_supported,
        lab_up,
    )

    if reason := lab_supported():
        print(f"gateway lab: {reason}", file=sys.stderr)
        return 2
    if args.gateways is not None:
        return cluster_command(args)
    lab = Lab(prefix=args.prefix)
    state_dir = args.state_dir.resolve()
    try:
        if args.action == "up":
            problems = lab_up(lab, args.config.resolve(), state_dir)
            for problem in problems:
                print(f"gateway lab: {problem}", file=sys.stderr)
            _, lines = lab_status(lab, state_dir)
            print("\n".join(lines))
            return 1 if problems else 0
        if args.action == "down":
            lab_down(lab, state_dir)
            print(f"lab {args.prefix} removed")
            return 0
        healthy, lines = lab_status(lab, state_dir)
        print("\n".join(lines))
        return 0 if healthy else 1
    except (LabError, ConfigError) as exc:
        print(f"gateway lab: {exc}", file=sys.stderr)
        return 2


def _cluster_prefix(args: argparse.Namespace) -> str:
    return "gwc" if args.prefix == "gwlab" else args.prefix


def _cluster_state(args: argparse.Namespace) -> Path:
    prefix = _cluster_prefix(args)
    folder = REPO_ROOT / "state" / f"lab-{prefix}" if args.state_dir == DEFAULT_LAB_STATE else args.state_dir
    return folder / "cluster.json"


def cluster_command(args: argparse.Namespace) -> int:
    """`gateway lab up --gateways N --balancer haproxy`, and `down` / `status` of that cluster."""
    from gateway.ops.lab import LabError
    from gateway.ops.labcluster import ClusterLab

    state = _cluster_state(args)
    gateways = args.gateways or (json.loads(state.read_text())["gateways"] if state.is_file() else 2)
    try:
        lab = ClusterLab(_cluster_prefix(args), gateways, state.parent.resolve())
        if args.action == "down":
            lab.down()
            print(f"cluster lab {lab.prefix} removed")
            return 0
        problems = lab.up() if args.action == "up" else []
        for problem in problems:
            print(f"gateway lab: {problem}", file=sys.stderr)
        print("\n".join(lab.status()))
        print(f"configurations: {lab.state_dir}/*/gateway.yaml, haproxy.cfg, keepalived.conf, peers.yaml")
        return 1 if problems else 0
    except LabError as exc:
        print(f"gateway lab: {exc}", file=sys.stderr)
        return 2


def doctor_command(args: argparse.Namespace) -> int:
    from gateway.ops.doctor import diagnose

    config = _load(args)
    if config is None:
        return 2
    if args.peers is not None:
        return doctor_peers(config, args.peers)
    problems = diagnose(config)
    for problem in problems:
        print(f"PROBLEM: {problem.message}\n    fix: {problem.fix}")
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print("ok: no forwarding between zones, zone interfaces up with their addresses, routes on the right side")
    return 0


def doctor_peers(config, peers_file: Path) -> int:
    from gateway import __version__
    from gateway.commands.cluster import load_peers_or_print
    from gateway.ops.sameconfig import compare_peers

    peers = load_peers_or_print(peers_file)
    if peers is None:
        return 2
    lines, problems = compare_peers(config, peers, __version__)
    print("\n".join(lines))
    for problem in problems:
        print(f"PROBLEM: {problem}")
    if problems:
        print("    fix: install the same gateway version, configuration files, DLP rules and catalogue on every "
              "machine (only names, addresses and the trace origin differ), then reload (systemctl reload gateway)")
        return 1
    print(f"ok: {len(peers.peers)} machines run the same configuration, catalogue and version")
    return 0


def drain_command(args: argparse.Namespace) -> int:
    from gateway.ops.drain import drain

    config = _load(args)
    if config is None:
        return 2
    stopped, message = drain(config, args.timeout)
    print(f"gateway drain: {message}", file=sys.stdout if stopped else sys.stderr)
    return 0 if stopped else 1


def sentinel_command(args: argparse.Namespace) -> int:
    from gateway.ops.sentinel import run_sentinel

    config = _load(args)
    if config is None:
        return 2
    metrics = None if args.metrics == "off" else args.metrics
    return run_sentinel(config, metrics_listen=metrics, alerts_file=args.alerts)


def _load(args: argparse.Namespace):
    try:
        return load_config(args.config, frontend=args.frontend)
    except ConfigError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return None

