"""One proxy worker process, started by the supervisor (gateway.proxy.supervisor) as
`python -m gateway.proxy.worker INDEX ...`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from gateway.config.load import ConfigError
from gateway.proxy.listeners import WorkerRole, parse_listen_fds


def worker_main(argv: list[str] | None = None) -> int:
    """`python -m gateway.proxy.worker INDEX ...`: one proxy worker (started by the supervisor)."""
    parser = argparse.ArgumentParser(prog="gateway-worker", description=worker_main.__doc__)
    parser.add_argument("index", type=int)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--of", type=int, required=True, help="how many workers the supervisor runs")
    parser.add_argument("--listen-fds", default="")
    parser.add_argument("-c", "--config", type=Path)
    parser.add_argument("--frontend")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s worker-{args.index} %(name)s: %(message)s")
    from gateway.proxy.engine import GatewayServer

    role = WorkerRole(args.index, args.of, args.parent, parse_listen_fds(args.listen_fds))
    try:
        server = GatewayServer(args.config, args.frontend, worker=role)
    except ConfigError as e:
        print("\n".join(e.errors), file=sys.stderr)
        return 2
    asyncio.run(server.serve())
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
