"""What an HAProxy in front of a gateway adds: its own CPU per transfer, and latency, against the direct path.

    .venv/bin/python bench/balancer.py [--seconds 5] [--connections 16] [--sizes 1024,65536,1048576]
                                       [--rounds 2] [--close]

One gateway (1 worker, the full pipeline) publishes bench/proxy.py's fast upstream twice: on a plain
reverse listener (the direct path) and on a copy of it with `proxy_protocol: v2` behind a real HAProxy
(TCP mode, `send-proxy-v2` with CRC32C, health checks on /readyz: gateway.ops.cluster.haproxy_config,
the configuration the lab and frontends/cluster/ use). The same wrk load (1 thread, keep-alive, or a
new connection per transfer with --close: the balancer's worst case, a PROXY header and a backend
connection per transfer) POSTs clean text of each size through both, interleaved round by round.

Printed for each size and path: req/s, p50 and p99 latency, the CPU the gateway's processes and HAProxy's
process used per transfer (from /proc/PID/stat: CPU seconds are far steadier than throughput on a shared
machine), then the balanced/direct ratios and HAProxy's CPU as a share of the gateway's. The load
average is printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.proxy import FAST_UPSTREAM, WRK_SCRIPT, clean_body, process_tree_cpu, wrk  # noqa: E402
from gateway.ops.cluster import GatewayMachine, haproxy_config  # noqa: E402
from tests.gatewayproc import Process, free_port, gateway_config, start_gateway, write_config  # noqa: E402

BALANCER = "127.0.0.5"  # HAProxy's source address towards the gateway: the listener's trusted proxy
CLOSE_SCRIPT = 'wrk.headers["Connection"] = "close"\n'


def measured(pids: dict[str, int], port: int, body: Path, seconds: int, connections: int, script: Path) -> dict:
    """wrk's figures plus each named process tree's CPU milliseconds per transfer."""
    before = {name: process_tree_cpu(pid) for name, pid in pids.items()}
    started = time.monotonic()
    result = wrk(port, body, seconds, connections, script)
    transfers = result["rps"] * (time.monotonic() - started)
    for name, pid in pids.items():
        result[f"{name}_ms"] = (process_tree_cpu(pid) - before[name]) * 1000 / max(transfers, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5, help="length of each measured run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--sizes", default="1024,65536,1048576")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved runs of each path per size")
    parser.add_argument("--close", action="store_true", help="a new connection for every transfer")
    args = parser.parse_args()
    for tool in ("wrk", "haproxy"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: apt-get install {tool}")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        script = root / "post.lua"
        script.write_text(WRK_SCRIPT + (CLOSE_SCRIPT if args.close else ""))
        upstream_port = free_port("127.0.0.2")
        processes = [Process([sys.executable, "-c", FAST_UPSTREAM, str(upstream_port)]).started("ready")]
        try:
            config = gateway_config(root / "state", workers=1)
            direct = next(l for l in config["listeners"] if l["mode"] == "reverse")
            direct["upstream"] = f"http://127.0.0.2:{upstream_port}"
            behind = {**direct, "name": "behind-haproxy", "listen": f"127.0.0.1:{free_port()}",
                      "proxy_protocol": "v2", "trusted_proxies": [f"{BALANCER}/32"]}
            config["listeners"].append(behind)
            processes.append(start_gateway(write_config(root / "gateway.yaml", config)))
            gateway_pid = processes[-1].proc.pid
            front = free_port()
            management = int(config["management"]["listen"].rsplit(":", 1)[1])
            (root / "haproxy.cfg").write_text(haproxy_config(
                ("127.0.0.1", front), [GatewayMachine("gw1", "127.0.0.1", int(behind["listen"].rsplit(":", 1)[1]),
                                                      management)], source=BALANCER))
            processes.append(Process(["haproxy", "-db", "-f", str(root / "haproxy.cfg")]))
            haproxy_pid = processes[-1].proc.pid
            time.sleep(4)  # HAProxy's health checks see /readyz (rise 2, inter 1 s)
            paths = {"direct": (int(direct["listen"].rsplit(":", 1)[1]), {"gateway": gateway_pid}),
                     "haproxy": (front, {"gateway": gateway_pid, "haproxy": haproxy_pid})}
            print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
                  f"{os.cpu_count()} cores; wrk 1 thread, {args.connections} connections, {args.seconds} s runs, "
                  f"{args.rounds} rounds, {'a new connection per transfer' if args.close else 'keep-alive'}")
            print(f"{'size':>9} {'path':<8} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'non-2xx':>7} {'sock err':>8} "
                  f"{'gateway ms/transfer':>19} {'haproxy ms/transfer':>19}")
            for size in (int(s) for s in args.sizes.split(",")):
                body = root / f"body-{size}"
                body.write_bytes(clean_body(size))
                for port, _ in paths.values():  # warm-up
                    wrk(port, body, 2, args.connections, script)
                runs = {name: [] for name in paths}
                for _ in range(args.rounds):  # interleaved: the shared machine's drift hits both alike
                    for name, (port, pids) in paths.items():
                        runs[name].append(measured(pids, port, body, args.seconds, args.connections, script))
                median = {name: {key: statistics.median(r[key] for r in results) for key in results[0]}
                          for name, results in runs.items()}
                for name, m in median.items():
                    haproxy = f"{m['haproxy_ms']:>19.3f}" if "haproxy_ms" in m else f"{'':>19}"
                    print(f"{size:>9} {name:<8} {m['rps']:>7.0f} {m['p50']:>7.2f} {m['p99']:>7.2f} "
                          f"{sum(r['non_2xx'] for r in runs[name]):>7} {sum(r['failed'] - r['non_2xx'] for r in runs[name]):>8} "
                          f"{m['gateway_ms']:>19.3f} {haproxy}")
                d, h = median["direct"], median["haproxy"]
                print(f"{size:>9} ratio haproxy/direct: p50 {h['p50'] / d['p50']:.2f} ({h['p50'] - d['p50']:+.2f} ms), "
                      f"p99 {h['p99'] / d['p99']:.2f}, req/s {h['rps'] / d['rps']:.2f}, gateway CPU/transfer "
                      f"{h['gateway_ms'] / d['gateway_ms']:.2f}; HAProxy CPU = {h['haproxy_ms'] / d['gateway_ms']:.1%} "
                      f"of the gateway's; one HAProxy core carries ~{1000 / h['haproxy_ms']:,.0f} transfers/s")
            print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        finally:
            for process in reversed(processes):
                process.stop()


if __name__ == "__main__":
    main()
