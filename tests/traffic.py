"""Mixed and hostile client traffic through a gateway (or a boundary of several), and the check that
nothing was lost: one implementation for bench/soak.py and the cluster lab's tests.

Each client sends, until told to stop, a random mix of: clean GETs and POSTs, requests carrying an ID
number (blocked), in clear, as base64 in a JSON value, or inside JSON nested too deeply to parse,
requests to an upstream in no zone (denied), to a closed port (upstream failed, 502), unparsable and
smuggling-shaped requests (400), endless heads (431), heads never finished (408, with a short
request_head_timeout), CONNECT tunnels carrying a binary stream (the CONNECT answered 200, the stream
refused 400), and 2 MiB bodies. Every outcome is kept: an answer with its transfer id and status, or
a request cut off with no answer (the exception's name), or an answer without a transfer id (a loss:
its error is NO_TRANSFER_ID).

Run as `python -m tests.traffic PROXY UPSTREAM CLOSED --clients N --seconds S` (inside a client
namespace, as the cluster lab does) it prints one JSON outcome a line; `audit` then holds the outcomes
against the machines' verified logs.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx

from tests.gatewayproc import REPO, start_upstream

ID_NUMBER = "11010519491231002X"
HIDDEN_ID = base64.b64encode(f"身份证号,{ID_NUMBER}\n".encode()).decode()
DEEP_JSON = ("[" * 50_000 + f'"a\\n {ID_NUMBER}"' + "]" * 50_000).encode()
# The status each kind must get.
EXPECTED = {"clean": 200, "post": 200, "large": 200, "blocked": 403, "hidden": 403, "deep": 403, "denied": 403,
            "unreachable": 502, "garbage": 400, "smuggle": 400, "endless": 431, "slow": 408, "tunnel-connect": 200,
            "tunnel-binary": 400}
NO_TRANSFER_ID = "no transfer id"  # the error of an answer that names no transfer: never acceptable
IDEMPOTENT = {"GET", "HEAD", "OPTIONS", "PUT", "DELETE"}  # RFC 9110 9.2.2
KINDS = {"clean": 30, "post": 20, "blocked": 10, "denied": 8, "unreachable": 5, "garbage": 8, "smuggle": 7,
         "endless": 4, "large": 8, "tunnel": 5, "slow": 1, "hidden": 5, "deep": 3}


class Traffic:
    """One client's mix. `outcomes`: {"t", "kind"} with "id" and "status" for an answer carrying a
    transfer id, or "error" (the exception's name) for a request cut off or answered without one."""

    def __init__(self, proxy: str, upstream: str, closed: str, seed: int):
        self.proxy, self.upstream, self.closed = proxy, upstream, closed
        self.rng = random.Random(seed)
        self.seed, self.sent = seed, 0
        self.outcomes: list[dict] = []

    def run(self, until: float) -> None:
        with httpx.Client(proxy=self.proxy, timeout=20) as client:
            while time.monotonic() < until:
                kind = self.rng.choices(list(KINDS), list(KINDS.values()))[0]
                try:
                    if kind == "tunnel":
                        self._tunnel()
                    elif kind in ("garbage", "smuggle", "endless", "slow"):
                        self._raw(kind)
                    else:
                        self._http(client, kind)
                except (httpx.HTTPError, OSError) as e:
                    self.outcomes.append({"t": time.time(), "kind": kind, "error": type(e).__name__})
                    time.sleep(0.05)  # not a busy loop while nothing answers

    def _answered(self, kind: str, transfer_id: str | None, status: int) -> None:
        named = {"id": transfer_id} if transfer_id else {"error": NO_TRANSFER_ID}
        self.outcomes.append({"t": time.time(), "kind": kind, "status": status, **named})

    def _http(self, client: httpx.Client, kind: str) -> None:
        self.sent += 1
        mark = f"m={self.seed}-{self.sent}"  # what the upstream's log and the records' URLs are matched on
        if kind == "clean":
            self._send(client, kind, "GET", f"{self.upstream}/text?body=soak&{mark}")
        elif kind == "post":
            self._send(client, kind, "POST", f"{self.upstream}/echo?{mark}",
                       content=os.urandom(self.rng.randrange(1, 65536)))
        elif kind == "blocked":
            self._send(client, kind, "POST", f"{self.upstream}/echo?{mark}", json={"sfzh": ID_NUMBER})
        elif kind == "denied":
            self._send(client, kind, "GET", f"http://198.51.100.7/?{mark}")
        elif kind == "unreachable":
            self._send(client, kind, "GET", f"{self.closed}/x?{mark}")
        elif kind == "hidden":  # an ID number as base64 in a JSON value: blocked
            self._send(client, kind, "POST", f"{self.upstream}/echo?{mark}", json={"file": HIDDEN_ID})
        elif kind == "deep":  # JSON nested past what the parser can walk: uninspectable, blocked
            self._send(client, kind, "POST", f"{self.upstream}/echo?{mark}", content=DEEP_JSON,
                       headers={"content-type": "application/json"})
        else:
            self._send(client, kind, "POST", f"{self.upstream}/sink?{mark}", content=b"soak filler text " * (2 << 16))

    def _send(self, client: httpx.Client, kind: str, method: str, url: str, **options) -> None:
        """One request, as a conforming client sends it (RFC 9112 9.3.1): an idempotent request that a
        reused (kept-alive) connection closed before any byte of an answer is sent once more, on a new
        connection, and counted (`retried`: the first attempt's error). A non-idempotent one is not: its
        cut is kept with `reused`, so that the check can tell the inherent keep-alive race from a loss."""
        events: list[str] = []
        try:
            response = client.request(method, url, extensions={"trace": lambda name, _: events.append(name)},
                                      **options)
        except httpx.HTTPError as e:
            reused = "connection.connect_tcp.started" not in events
            unanswered = not any(name.endswith("receive_response_headers.complete") for name in events)
            if not (reused and unanswered and method in IDEMPOTENT):
                self.outcomes.append({"t": time.time(), "kind": kind, "error": type(e).__name__, "reused": reused,
                                      "unanswered": unanswered})
                time.sleep(0.05)  # not a busy loop while nothing answers
                return
            response = client.request(method, url, **options)  # the broken connection left the pool
            self.outcomes.append(self._answer_of(kind, response) | {"retried": type(e).__name__})
            return
        self.outcomes.append(self._answer_of(kind, response))

    def _answer_of(self, kind: str, response: httpx.Response) -> dict:
        transfer_id = response.headers.get("x-gateway-transfer-id")
        named = {"id": transfer_id} if transfer_id else {"error": NO_TRANSFER_ID}
        return {"t": time.time(), "kind": kind, "status": response.status_code, **named}

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
        if not answer:
            raise ConnectionResetError("closed without an answer")
        head = answer.split(b"\r\n\r\n", 1)[0].decode(errors="replace")
        found = re.search(r"(?im)^x-gateway-transfer-id: (\S+)", head)
        self._answered(kind, found.group(1) if found else None, int(head.split()[1]))


def run_clients(proxy: str, upstream: str, closed: str, clients: int, seconds: float, seed: int = 0) -> list[dict]:
    """`clients` threads of Traffic for `seconds`; every outcome, in time order."""
    until = time.monotonic() + seconds
    traffic = [Traffic(proxy, upstream, closed, seed + i) for i in range(clients)]
    threads = [threading.Thread(target=t.run, args=(until,)) for t in traffic]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted((o for t in traffic for o in t.outcomes), key=lambda o: o["t"])


def start_clients(prefix: list[str], proxy: str, upstream: str, closed: str, clients: int, seconds: float,
                  seed: int = 0) -> subprocess.Popen:
    """run_clients as a process of its own, started with `prefix` (e.g. `ip netns exec CLIENT-NS`)."""
    return subprocess.Popen([*prefix, sys.executable, "-m", "tests.traffic", proxy, upstream, closed, "--clients",
                             str(clients), "--seconds", str(seconds), "--seed", str(seed)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)


LAB_UPSTREAM_PORT = 8001  # in the cluster lab; the port after it stays closed (the unreachable upstream)
LAB_UPSTREAM_LOG = "upstream.jsonl"  # in the lab's state folder


def start_lab_upstream(lab):
    """tests/upstream_server.py in the cluster lab's upstream namespace (beside the lab's own server)."""
    from gateway.ops.labcluster import INET

    return start_upstream(f"{INET}.2", LAB_UPSTREAM_PORT, lab.state_dir / LAB_UPSTREAM_LOG, prefix=lab.command("up", []))


def start_lab_clients(lab, clients: int, seconds: float) -> subprocess.Popen:
    """The clients in the cluster lab's client namespace, through the balancers' floating address."""
    from gateway.ops.labcluster import FLOATING, INET, PROXY_PORT

    return start_clients(lab.command("client", []), f"http://{FLOATING}:{PROXY_PORT}",
                         f"http://{INET}.2:{LAB_UPSTREAM_PORT}", f"http://{INET}.2:{LAB_UPSTREAM_PORT + 1}",
                         clients, seconds)


def outcomes_of(clients: subprocess.Popen, timeout: float) -> list[dict]:
    out, _ = clients.communicate(timeout=timeout)
    if clients.returncode != 0:
        raise RuntimeError(f"the clients' process failed ({clients.returncode})")
    return [json.loads(line) for line in out.splitlines()]


def final_records(records: list[dict]) -> list[dict]:
    """A log's final record of each transfer (a forwarded transfer's completion, a refused one's only
    record); an open record (written before forwarding) is not an answer's record."""
    return [r for r in records if r.get("phase") != "open"]


def audit(outcomes: list[dict], logs: dict[str, list[dict]], upstream_log: Path) -> dict[str, list]:
    """What is lost or wrong, by finding (empty lists: nothing). `logs`: each machine's verified records
    (trace_records); `upstream_log`: what the upstream server received. Every answer must be in exactly
    one machine's log, once, with the status the client saw, which is the one its kind gets (EXPECTED:
    every request carrying an ID number refused 403: a clean request refused 503 by a draining machine
    is wrong too); no answer may lack a transfer id; every request the upstream received (answered or
    not) must have a record, open or final."""
    where = _where(logs)
    answered = [o for o in outcomes if "id" in o]
    recorded = {mark for records in logs.values() for record in records
                for mark in parse_qs(urlsplit(record.get("url") or "").query).get("m", [])}
    return {
        "reached the upstream without a record": [mark for mark in received_marks(upstream_log)
                                                  if mark not in recorded],
        "answered without a transfer id": [o for o in outcomes if o.get("error") == NO_TRANSFER_ID],
        "answered but in no log": [o for o in answered if not where[o["id"]]],
        "recorded more than once": [(i, [m for m, _ in found]) for i, found in where.items() if len(found) > 1],
        "status differs from the record": [o for o in answered if len(where[o["id"]]) == 1
                                           and where[o["id"]][0][1]["status"] != o["status"]],
        "status not the one its kind gets": [o for o in answered if o["status"] != EXPECTED[o["kind"]]],
    }


def received_marks(upstream_log: Path) -> list[str]:
    """The marks of the clients' requests the upstream server logged."""
    return [mark for line in upstream_log.read_text().splitlines()
            for mark in parse_qs(urlsplit(json.loads(line)["path"]).query).get("m", [])]


def _where(logs: dict[str, list[dict]]) -> dict[str, list[tuple[str, dict]]]:
    """Transfer id -> the (machine, final record) pairs that hold it."""
    where: dict[str, list[tuple[str, dict]]] = defaultdict(list)
    for machine, records in logs.items():
        for record in final_records(records):
            where[record["id"]].append((machine, record))
    return where


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("proxy", help="http://HOST:PORT")
    parser.add_argument("upstream", help="http://HOST:PORT of tests/upstream_server.py")
    parser.add_argument("closed", help="http://HOST:PORT where nothing listens")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for outcome in run_clients(args.proxy, args.upstream, args.closed, args.clients, args.seconds, args.seed):
        print(json.dumps(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main())
