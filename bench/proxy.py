"""Requests/s and latency through stock mitmdump (no addons) and through the gateway, in one run.

    .venv/bin/python bench/proxy.py [--requests N] [--concurrency C] [--sizes 1024,1048576]

Both proxies run as explicit forward proxies in front of the same fast upstream on 127.0.0.2, and the
same load generator (ApacheBench, Debian's apache2-utils) POSTs clean bodies of each size through them
with keep-alive. Printed: requests/s, p50 and p99 latency for each, and the gateway/mitmdump ratios
(the machine is shared and noisy: only ratios from the same run mean much).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.gatewayproc import Process, free_port, gateway_config, start_gateway, write_config  # noqa: E402

FAST_UPSTREAM = """
import asyncio, sys
# A minimal keep-alive HTTP/1.1 server answering every request with "ok": fast enough not to be the
# bottleneck of either proxy.
class Upstream(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer, self.need = transport, b"", None
    def data_received(self, data):
        self.buffer += data
        while True:
            if self.need is None:
                end = self.buffer.find(b"\\r\\n\\r\\n")
                if end < 0:
                    return
                head = self.buffer[:end].lower()
                length = 0
                for line in head.split(b"\\r\\n"):
                    if line.startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                self.buffer, self.need = self.buffer[end + 4:], length
            if len(self.buffer) < self.need:
                return
            self.buffer, self.need = self.buffer[self.need:], None
            self.transport.write(b"HTTP/1.1 200 OK\\r\\nContent-Type: text/plain\\r\\nContent-Length: 2\\r\\n\\r\\nok")
async def main():
    server = await asyncio.get_running_loop().create_server(Upstream, "127.0.0.2", int(sys.argv[1]))
    print("ready", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


def clean_body(size: int) -> bytes:
    """Text that looks like business data but holds nothing sensitive (no digit runs a detector wants)."""
    words = ["report", "quarter", "district", "budget", "schedule", "transport", "clinic", "school",
             "数据", "开放", "目录", "统计", "交通", "教育", "卫生"]
    rng = random.Random(size)
    text = " ".join(rng.choice(words) for _ in range(size // 4 + 1)).encode()
    # Cut on a character boundary and pad: a body cut inside a character is (rightly) uninspectable.
    return text[:size].decode("utf-8", "ignore").encode().ljust(size, b" ")


def ab(proxy_port: int, url: str, body: Path, requests: int, concurrency: int) -> dict[str, float]:
    result = subprocess.run(
        ["ab", "-q", "-k", "-n", str(requests), "-c", str(concurrency), "-X", f"127.0.0.1:{proxy_port}",
         "-p", str(body), "-T", "text/plain; charset=utf-8", url],
        capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"ab failed: {result.stderr or result.stdout}")
    out = result.stdout
    failed = int(re.search(r"Failed requests:\s+(\d+)", out).group(1))
    non_2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    return {
        "rps": float(re.search(r"Requests per second:\s+([\d.]+)", out).group(1)),
        "p50": float(re.search(r"\s50%\s+(\d+)", out).group(1)),
        "p99": float(re.search(r"\s99%\s+(\d+)", out).group(1)),
        "failed": failed + (int(non_2xx.group(1)) if non_2xx else 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000, help="requests per 1 KiB run (fewer for larger)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sizes", default="1024,1048576")
    args = parser.parse_args()
    if not shutil.which("ab"):
        raise SystemExit("ApacheBench is missing: apt-get install apache2-utils")
    mitmdump = Path(sys.executable).with_name("mitmdump")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        upstream_port = free_port("127.0.0.2")
        upstream = Process([sys.executable, "-c", FAST_UPSTREAM, str(upstream_port)])
        upstream.wait_for("ready")
        config = gateway_config(root / "state")
        gateway_port = int(config["listeners"][0]["listen"].rsplit(":", 1)[1])
        gateway = start_gateway(write_config(root / "gateway.yaml", config))
        stock_port = free_port()
        stock = Process([str(mitmdump), "-q", "--mode", f"regular@127.0.0.1:{stock_port}",
                         "--set", f"confdir={root / 'mitmproxy'}"])
        time.sleep(3)
        try:
            print(f"cpu cores: {os.cpu_count()}; concurrency {args.concurrency}; ab keep-alive POST")
            print(f"{'size':>9} {'proxy':<9} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'failed':>6}")
            for size in (int(s) for s in args.sizes.split(",")):
                body = root / f"body-{size}"
                body.write_bytes(clean_body(size))
                requests = args.requests if size <= 1024 else max(100, args.requests // 10)
                url = f"http://127.0.0.2:{upstream_port}/bench"
                ab(stock_port, url, body, min(200, requests), args.concurrency)  # warm-up
                ab(gateway_port, url, body, min(200, requests), args.concurrency)
                runs = {"mitmdump": [], "gateway": []}
                for _ in range(2):  # interleaved, so drift on a shared machine hits both alike
                    runs["mitmdump"].append(ab(stock_port, url, body, requests, args.concurrency))
                    runs["gateway"].append(ab(gateway_port, url, body, requests, args.concurrency))
                best = {name: max(results, key=lambda r: r["rps"]) for name, results in runs.items()}
                for name, r in best.items():
                    print(f"{size:>9} {name:<9} {r['rps']:>9.0f} {r['p50']:>7.0f} {r['p99']:>7.0f} {r['failed']:>6}")
                print(f"{size:>9} ratio gateway/mitmdump: req/s {best['gateway']['rps'] / best['mitmdump']['rps']:.2f}, "
                      f"p99 {best['gateway']['p99'] / max(best['mitmdump']['p99'], 1):.2f}")
        finally:
            for process in (stock, gateway, upstream):
                process.stop()


if __name__ == "__main__":
    main()
