"""For the trace log's test modules: `gateway trace ...` run in-process, and a small log to run it on."""

import argparse
from collections.abc import Iterable
from pathlib import Path

from gateway.commands import trace as trace_cli
from gateway.trace import TraceLog


def run_trace(*argv: str) -> int:
    """Exit status of `gateway trace ARGV...`."""
    parser = argparse.ArgumentParser(prog="gateway")
    trace_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["trace", *argv])
    return args.func(args)


def write_log(base: Path, origin: str, records: Iterable[dict]) -> Path:
    """BASE/log holding `records`, signed by BASE/key (BASE/key.pub). The journal rotates after every
    bundle, so full bundles are immutable files and the last partial one is in the journal."""
    with TraceLog.open(base / "log", origin=origin, signing_key=base / "key", rotate_bundles=1) as log:
        for record in records:
            log.append_sync(record)
    return base
