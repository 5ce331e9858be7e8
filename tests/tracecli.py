"""`gateway trace ...` run in-process, as the command line parses it (for the trace log's test modules)."""

import argparse

from gateway.commands import trace as trace_cli


def run_trace(*argv: str) -> int:
    """Exit status of `gateway trace ARGV...`."""
    parser = argparse.ArgumentParser(prog="gateway")
    trace_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["trace", *argv])
    return args.func(args)
