"""CPU per 1 KiB transfer of a one-worker gateway, per thread: steadier than req/s on a shared machine.

    .venv/bin/python bench/proxy_cpu.py [--seconds 8] [--runs 2] [--size 1024]

The same fast upstream, clean body and wrk load as bench/proxy.py (16 connections, keep-alive POSTs);
for each run, the utime+stime every thread of the gateway process used (/proc/PID/task/*/stat) divided
by the requests wrk counted. Printed: microseconds of CPU per transfer, in total and for the event loop
thread ("main") and each other thread that used at least 3 us (the trace log's writer and files
threads, the inspection watchdog), with the load average. To compare two trees, run each tree's own
copy alternately.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from proxy import FAST_UPSTREAM, WRK_SCRIPT, clean_body, wrk  # noqa: E402

from tests.gatewayproc import Process, free_port, gateway_config, start_gateway, write_config  # noqa: E402


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of each thread of `pid`: "main" for the process's first thread, else its id."""
    ticks, used = os.sysconf("SC_CLK_TCK"), {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue  # ended meanwhile
        used["main" if task.name == str(pid) else task.name] = (int(fields[11]) + int(fields[12])) / ticks
    return used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        script, body = root / "post.lua", root / "body"
        script.write_text(WRK_SCRIPT)
        body.write_bytes(clean_body(args.size))
        upstream_port = free_port("127.0.0.2")
        upstream = Process([sys.executable, "-c", FAST_UPSTREAM, str(upstream_port)]).started("ready")
        config = gateway_config(root / "gateway", workers=1)
        config["listeners"][1]["upstream"] = f"http://127.0.0.2:{upstream_port}"
        port = int(config["listeners"][1]["listen"].rsplit(":", 1)[1])
        gateway = start_gateway(write_config(root / "gateway.yaml", config))
        try:
            wrk(port, body, 3, 16, script)  # warm-up
            for _ in range(args.runs):
                load = Path("/proc/loadavg").read_text().split()[0]
                before = thread_cpu(gateway.proc.pid)
                result = wrk(port, body, args.seconds, 16, script)
                after = thread_cpu(gateway.proc.pid)
                transfers = result["rps"] * args.seconds
                per = {name: (used - before.get(name, 0.0)) / transfers * 1e6 for name, used in after.items()}
                threads = ", ".join(f"{name} {us:.0f}" for name, us in sorted(per.items(), key=lambda item: -item[1])
                                    if us >= 3)
                print(f"{sum(per.values()):.0f} us/transfer ({threads}); {result['rps']:.0f} req/s, "
                      f"{result['failed']} failed, load {load}", flush=True)
        finally:
            gateway.stop()
            upstream.stop()


if __name__ == "__main__":
    main()
