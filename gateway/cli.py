"""The `gateway` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import select
import shutil
import sys
from pathlib import Path

from gateway import __version__
from gateway.commands import cluster as cluster_commands
from gateway.commands import consent as consent_commands
from gateway.commands import dlp as dlp_commands
from gateway.commands import grant as grant_commands
from gateway.commands import ops as ops_commands
from gateway.commands import trace as trace_commands
from gateway.commands import usage as usage_commands
from gateway.config.load import DEFAULT_CONFIG, FRONTENDS_DIR, ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="Boundary secure data gateway")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="start the gateway")
    _config_args(run)
    run.set_defaults(func=_run)

    check = commands.add_parser("check", help="check a configuration; exit 2 listing every error")
    _config_args(check)
    check.add_argument("--all-frontends", action="store_true",
                       help="also check the configuration layered with every profile in frontends/")
    check.set_defaults(func=_check)

    ca = commands.add_parser("ca", help="the gateway's own CA, which signs intercepted TLS")
    ca_commands = ca.add_subparsers(dest="ca_command", required=True, metavar="SUBCOMMAND")
    export = ca_commands.add_parser("export", help="write the CA certificate (PEM) for clients to trust")
    _config_args(export)
    export.add_argument("-o", "--output", type=Path, help="file to write (default: standard output)")
    export.set_defaults(func=_ca_export)
    create = ca_commands.add_parser("create", help="create the CA now (the gateway otherwise creates it on its "
                                                   "first start); an existing one is kept")
    _config_args(create)
    create.add_argument("-o", "--output", type=Path, help="also write its certificate (PEM) here")
    create.set_defaults(func=_ca_create)

    for module in (dlp_commands, trace_commands, ops_commands, grant_commands, consent_commands,
                   usage_commands, cluster_commands):
        module.register(commands)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise
        # The reader (`| head`) took what it wanted and left: no traceback now, and none when Python
        # flushes stdout at exit. The output was cut, so this is not success.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 2


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe nobody reads any more (poll says POLLERR), rather than some socket."""
    poller = select.poll()
    poller.register(sys.stdout.fileno(), select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG,
                        help=f"configuration file (default: {DEFAULT_CONFIG})")
    parser.add_argument("--frontend", metavar="NAME",
                        help=f"layer the front-end profile {FRONTENDS_DIR}/NAME.yaml over the configuration")


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        workers = load_config(args.config, args.frontend).workers
        if workers > 1:
            from gateway.proxy.supervisor import Supervisor

            server = Supervisor(args.config, args.frontend)  # no mitmproxy in this process
        else:
            from gateway.proxy.engine import GatewayServer

            server = GatewayServer(args.config, args.frontend)
    except ConfigError as e:
        print("\n".join(e.errors), file=sys.stderr)
        return 2
    from gateway.ops.management import ManagementError
    from gateway.trace import TraceError

    try:
        status = asyncio.run(server.serve())
    except (ManagementError, TraceError, OSError) as e:
        print(f"gateway: {e}", file=sys.stderr)
        return 1
    return status or 0


def _check(args: argparse.Namespace) -> int:
    from gateway.config.runtime import build_runtime

    variants = [args.frontend]
    if args.all_frontends:
        variants += sorted(p.stem for p in FRONTENDS_DIR.glob("*.yaml"))
    errors: list[str] = []
    for frontend in dict.fromkeys(variants):
        try:
            build_runtime(load_config(args.config, frontend))
        except ConfigError as e:
            errors += [error for error in e.errors if error not in errors]
        else:
            print(f"{args.config}{' + ' + frontend if frontend else ''}: ok")
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 2
    return 0


def _ca_create(args: argparse.Namespace) -> int:
    """Before a first start, say to share one CA between the machines of a boundary."""
    from gateway.proxy.state import ensure_ca

    try:
        config = load_config(args.config, args.frontend)
    except ConfigError as e:
        print("\n".join(e.errors), file=sys.stderr)
        return 2
    certificate = ensure_ca(config.state_dir)
    if args.output:
        shutil.copyfile(certificate, args.output)
    print(f"gateway CA certificate: {certificate}", file=sys.stderr)
    return 0


def _ca_export(args: argparse.Namespace) -> int:
    """The CA of the gateway the configuration (default: the shipped one) describes; never a new one,
    which no running gateway would sign with."""
    from gateway.proxy.state import ca_certificate

    try:
        config = load_config(args.config, args.frontend)
    except ConfigError as e:
        print("\n".join(e.errors), file=sys.stderr)
        return 2
    certificate = ca_certificate(config.state_dir)
    if not certificate.is_file():
        print(f"gateway ca export: no CA in {certificate.parent} (configuration {config.source}): the gateway "
              f"creates it on its first start; start it (gateway run -c {config.source}) or name its "
              "configuration with -c", file=sys.stderr)
        return 1
    if args.output:
        shutil.copyfile(certificate, args.output)
    else:
        sys.stdout.write(certificate.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
