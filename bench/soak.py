"""Soak: mixed and hostile traffic through a multi-worker gateway while workers are killed; nothing lost.

    .venv/bin/python bench/soak.py [--minutes 3] [--clients 8] [--workers 2] [--kill-every 20]

Clients send, for the whole run, a random mix of: clean GETs and POSTs, requests carrying an ID number
(blocked), in clear, as base64 in a JSON value, or inside JSON nested too deeply to parse, requests to an upstream in no zone (denied), to a closed port (upstream failed, 502),
unparsable and smuggling-shaped requests (400), endless heads (431), heads never finished (408), CONNECT
tunnels carrying a binary stream (the CONNECT answered 200, the stream refused 400), and 2 MiB bodies. Every
`--kill-every` seconds one worker gets SIGKILL (the supervisor replaces it). Afterwards: the trace log
must verify, every transfer id a client received must be in it with the status the client saw, every
request carrying an ID number must have been refused 403, and
`gateway_transfers_total` must count every record. Prints the figures; exits 1 on any loss.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.gatewayproc import (  # noqa: E402
    free_port,
    gateway_config,
    listener_url,
    start_gateway,
    start_upstream,
    write_config,
)

ID_NUMBER = "11010519491231002X"
HIDDEN_ID = base64.b64encode(f"身份证号,{ID_NUMBER}\n".encode()).decode()
DEEP_JSON = ("[" * 50_000 + f'"a\\n {ID_NUMBER}"' + "]" * 50_000).encode()


class Traffic:
    """One client's mix; every answer that carried a transfer id is kept as (id, status, kind)."""

    def __init__(self, proxy: str, upstream: str, closed: str, seed: int):
        self.proxy, self.upstream, self.closed = proxy, upstream, closed
        self.rng = random.Random(seed)
        self.answered: list[tuple[str, int, str]] = []
        self.unanswered = Counter()  # kind -> requests cut off (a killed worker), expected and fine

    def run(self, until: float) -> None:
        with httpx.Client(proxy=self.proxy, timeout=20) as client:
            while time.monotonic() < until:
                kind = self.rng.choices(
                    ["clean", "post", "blocked", "denied", "unreachable", "garbage", "smuggle", "endless", "large",
                     "tunnel", "slow", "hidden", "deep"],
                    [30, 20, 10, 8, 5, 8, 7, 4, 8, 5, 1, 5, 3])[0]
                try:
                    if kind == "tunnel":
                        self._tunnel()
                    elif kind in ("garbage", "smuggle", "endless", "slow"):
                        self._raw(kind)
                    else:
                        self._http(client, kind)
                except (httpx.HTTPError, OSError):
                    self.unanswered[kind] += 1

    def _http(self, client: httpx.Client, kind: str) -> None:
        if kind == "clean":
            response = client.get(f"{self.upstream}/text?body=soak")
        elif kind == "post":
            response = client.post(f"{self.upstream}/echo", content=os.urandom(self.rng.randrange(1, 65536)))
        elif kind == "blocked":
            response = client.post(f"{self.upstream}/echo", json={"sfzh": ID_NUMBER})
        elif kind == "denied":
            response = client.get("http://198.51.100.7/")
        elif kind == "unreachable":
            response = client.get(f"{self.closed}/x")
        elif kind == "hidden":  # an ID number as base64 in a JSON value: blocked
            response = client.post(f"{self.upstream}/echo", json={"file": HIDDEN_ID})
        elif kind == "deep":  # JSON nested past what the parser can walk: uninspectable, blocked
            response = client.post(f"{self.upstream}/echo", content=DEEP_JSON, headers={"content-type": "application/json"})
        else:
            response = client.post(f"{self.upstream}/sink", content=b"soak filler text " * (2 << 16))
        self.answered.append((response.headers["x-gateway-transfer-id"], response.status_code, kind))

    def _raw(self, kind: str) -> None:
        host, port = self.proxy.removeprefix("http://").rsplit(":", 1)
        request = {
            "garbage": b"GARBAGE\r\n\r\n",
            "smuggle": f"POST {self.upstream}/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                       "Content-Length: 5\r\n\r\n0\r\n\r\n".encode(),
            "endless": b"GET / HTTP/1.1\r\nX-Filler: " + b"a" * 70_000,
            "slow": f"GET {self.upstream}/text HTTP/1.1\r\nHost: x\r\n".encode(),  # never finished: 408
        }[kind]
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(request)
            self._answer(sock, kind, until_closed=True)

    def _tunnel(self) -> None:
        """A CONNECT (a transfer of its own), then a binary stream inside it: refused 400, never relayed."""
        host, port = self.proxy.removeprefix("http://").rsplit(":", 1)
        target = self.upstream.removeprefix("http://")
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            self._answer(sock, "tunnel-connect", until_closed=False)
            sock.sendall(b"\x00\x01binary " + ID_NUMBER.encode())
            self._answer(sock, "tunnel-binary", until_closed=True)

    def _answer(self, sock: socket.socket, kind: str, until_closed: bool) -> None:
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if not until_closed and b"\r\n\r\n" in answer:
                break
        head = answer.split(b"\r\n\r\n", 1)[0].decode()
        found = re.search(r"(?im)^x-gateway-transfer-id: (\S+)", head)
        if not found:
            raise OSError(f"answer without a transfer id: {head[:80]!r}")
        self.answered.append((found.group(1), int(head.split()[1]), kind))


def worker_pids(lines: list[str]) -> list[int]:
    pids = {}
    for line in lines:
        if line.startswith("worker ") and " serving" in line:
            pids[line.split()[1]] = int(line.split("pid ")[1].split(")")[0])
    return list(pids.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-every", type=float, default=20, help="seconds between worker kills (0: none)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="soak-"))
    port = free_port("127.0.0.2")
    config = gateway_config(root / "state", workers=args.workers)
    config["gateway"]["request_head_timeout"] = "1s"  # the "slow" heads are cut off quickly
    path = write_config(root / "gateway.yaml", config)
    upstream = start_upstream("127.0.0.2", port, root / "upstream.log")
    gateway = start_gateway(path)
    proxy, management = listener_url(config, "forward"), f"http://{config['management']['listen']}"
    clients = [Traffic(proxy, f"http://127.0.0.2:{port}", f"http://127.0.0.2:{free_port('127.0.0.2')}", seed)
               for seed in range(args.clients)]
    until = time.monotonic() + args.minutes * 60
    threads = [threading.Thread(target=c.run, args=(until,)) for c in clients]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    kills = 0
    try:
        while time.monotonic() < until - 5:
            time.sleep(args.kill_every or 5)
            if args.kill_every and time.monotonic() < until - 5:
                victim = random.choice(worker_pids(gateway.lines))
                os.kill(victim, signal.SIGKILL)
                kills += 1
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        time.sleep(1)
        counted = sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(f"{management}/metrics").text.splitlines()
                      if line.startswith("gateway_transfers_total{"))
    finally:
        gateway.stop()
        upstream.stop()
    trace = root / "state" / "trace"
    verified = subprocess.run([sys.executable, "-m", "gateway", "trace", "verify", str(trace), "--pubkey",
                               str(trace / "trace-signing.pub")], capture_output=True, text=True, cwd=REPO)
    shown = subprocess.run([sys.executable, "-m", "gateway", "trace", "show", str(trace)],
                           capture_output=True, text=True, cwd=REPO, check=True)
    records = {r["id"]: r for r in (json.loads(line).get("record") for line in shown.stdout.splitlines())}
    answered = [a for c in clients for a in c.answered]
    missing = [a for a in answered if a[0] not in records]
    wrong = [a for a in answered if a[0] in records and records[a[0]]["status"] != a[1]]
    leaked = [a for a in answered if a[2] in ("blocked", "hidden", "deep") and a[1] != 403]
    by_kind = Counter(kind for _, _, kind in answered)
    cut_off = sum((c.unanswered for c in clients), Counter())
    print(f"{args.minutes:g} min, {args.clients} clients, {args.workers} workers, {kills} workers killed")
    print(f"answered with a transfer id: {len(answered)} ({len(answered) / elapsed:.0f}/s): "
          + ", ".join(f"{k} {n}" for k, n in by_kind.most_common()))
    print(f"cut off by a killed worker (no answer, nothing to find): {sum(cut_off.values())} "
          + ", ".join(f"{k} {n}" for k, n in cut_off.most_common()))
    print(f"trace log: {len(records)} records; verify: {verified.stdout.strip() or verified.stderr.strip()}")
    print(f"answered but not in the log: {len(missing)}; status differs from the record: {len(wrong)}; "
          f"sensitive requests not refused 403: {len(leaked)}")
    print(f"gateway_transfers_total: {counted:.0f} (records: {len(records)})")
    lost = missing or wrong or leaked or verified.returncode != 0 or counted < len(answered)
    print("LOST OR WRONG" if lost else "nothing lost")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
