"""Soak: mixed and hostile traffic while the gateway is broken or restarted under it; nothing lost.

    .venv/bin/python bench/soak.py [--minutes 3] [--clients 8] [--workers 2] [--kill-every 20]
    .venv/bin/python bench/soak.py --cluster 2 [--minutes 3] [--clients 8]

The clients' mix is tests/traffic.py's (clean and sensitive requests, denied and unreachable upstreams,
unparsable, smuggling-shaped, endless and unfinished heads, CONNECT tunnels carrying a binary stream,
2 MiB bodies). Afterwards every transfer id a client received must be in exactly one verified log,
once, with the status the client saw, which must be the one its kind gets (every request carrying an
ID number refused 403; tests.traffic.audit). Prints the figures; exits 1 on any loss.

One gateway (default): a multi-worker gateway on loopback; every `--kill-every` seconds one worker gets
SIGKILL (the supervisor replaces it). Its log must verify and `gateway_transfers_total` count every record.

A boundary (`--cluster N`): the namespace lab of gateway.ops.labcluster, N gateway machines behind
HAProxy (PROXY v2 with CRC32C) on a keepalived floating address; the clients run in the client
namespace and go through the balancer. For the whole run the machines are restarted in turn (`gateway
drain`, then a start: ClusterLab.roll), so that the roll goes round as often as the run allows. After
it, the machines' witnesses must have cosigned each other's logs to their end and `gateway trace verify
--peers` must pass for every origin. Requests cut off without an answer are counted (none is expected:
a draining gateway stays not ready but serving for its drain_delay while HAProxy sends new connections
elsewhere, and finishes what it holds), and so are the idempotent requests the clients sent again after
a reused keep-alive connection closed before any answer (RFC 9112 9.3.1; none expected either).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
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
    trace_records,
    write_config,
)
from tests.traffic import (  # noqa: E402
    LAB_UPSTREAM_LOG,
    audit,
    final_records,
    outcomes_of,
    received_marks,
    run_clients,
    start_lab_clients,
    start_lab_upstream,
)

HEAD_TIMEOUT = "1s"  # the clients' unfinished heads are cut off quickly


def worker_pids(lines: list[str]) -> list[int]:
    pids = {}
    for line in lines:
        if line.startswith("worker ") and " serving" in line:
            pids[line.split()[1]] = int(line.split("pid ")[1].split(")")[0])
    return list(pids.values())


def verify(*options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", "trace", "verify", *options], capture_output=True,
                          text=True, cwd=REPO)


def report(outcomes: list[dict], elapsed: float, logs: dict[str, list[dict]], upstream_log: Path,
           verified_ok: bool) -> bool:
    """Print the figures; True when something was lost or wrong."""
    answered = [o for o in outcomes if "id" in o]
    cut_off = Counter(f"{o['kind']} ({o['error']})" for o in outcomes if "id" not in o)
    findings = audit(outcomes, logs, upstream_log)
    print(f"answered with a transfer id: {len(answered)} ({len(answered) / elapsed:.0f}/s): "
          + ", ".join(f"{k} {n}" for k, n in Counter(o["kind"] for o in answered).most_common()))
    print(f"cut off without an answer: {sum(cut_off.values())} "
          + ", ".join(f"{k} {n}" for k, n in cut_off.most_common()))
    raced = [o for o in outcomes if "id" not in o and o.get("reused") and o.get("unanswered")]
    retried = Counter(f"{o['kind']} ({o['retried']})" for o in outcomes if "retried" in o)
    print(f"  of which on a reused connection closed before any answer byte (the keep-alive race): {len(raced)}; "
          f"idempotent requests cut so and answered when sent again: {sum(retried.values())} "
          + ", ".join(f"{k} {n}" for k, n in retried.most_common()))
    seen = {o["id"] for o in answered}
    unseen = Counter(r["status"] for records in logs.values() for r in final_records(records) if r["id"] not in seen)
    print("records: " + ", ".join(f"{m} {len(r)}" for m, r in logs.items())
          + f"; requests the upstream received: {len(received_marks(upstream_log))}; final records whose "
          f"answer no client got: {sum(unseen.values())} (by status: {dict(unseen)})")
    print("; ".join(f"{what}: {len(found)}" for what, found in findings.items()))
    for what, found in findings.items():
        if found:
            print(f"  {what}, e.g. {found[:3]}")
    lost = any(findings.values()) or not verified_ok
    print("LOST OR WRONG" if lost else "nothing lost")
    return lost


def soak_one(args: argparse.Namespace) -> bool:
    root = Path(tempfile.mkdtemp(prefix="soak-"))
    port = free_port("127.0.0.2")
    config = gateway_config(root / "state", workers=args.workers)
    config["gateway"]["request_head_timeout"] = HEAD_TIMEOUT
    path = write_config(root / "gateway.yaml", config)
    upstream = start_upstream("127.0.0.2", port, root / "upstream.log")
    gateway = start_gateway(path)
    proxy, management = listener_url(config, "forward"), f"http://{config['management']['listen']}"
    kills = []

    def kill_workers():
        while time.monotonic() < until - 5:
            time.sleep(args.kill_every)
            if time.monotonic() < until - 5:
                os.kill(random.choice(worker_pids(gateway.lines)), signal.SIGKILL)
                kills.append(time.monotonic())

    until = time.monotonic() + args.minutes * 60
    started = time.monotonic()
    killer = None
    try:
        if args.kill_every:
            killer = threading.Thread(target=kill_workers, daemon=True)
            killer.start()
        outcomes = run_clients(proxy, f"http://127.0.0.2:{port}", f"http://127.0.0.2:{free_port('127.0.0.2')}",
                               args.clients, args.minutes * 60)
        elapsed = time.monotonic() - started
        if killer:
            killer.join()
        time.sleep(1)
        counted = sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(f"{management}/metrics").text.splitlines()
                      if line.startswith("gateway_transfers_total{"))
    finally:
        gateway.stop()
        upstream.stop()
    trace = root / "state" / "trace"
    verified = verify(str(trace), "--pubkey", str(trace / "trace-signing.pub"))
    records = trace_records(trace)
    print(f"{args.minutes:g} min, {args.clients} clients, {args.workers} workers, {len(kills)} workers killed")
    print(f"trace log verify: {verified.stdout.strip() or verified.stderr.strip()}")
    print(f"gateway_transfers_total: {counted:.0f} (records: {len(records)})")
    answered = sum("id" in o for o in outcomes)
    return report(outcomes, elapsed, {"gateway": records}, root / "upstream.log",
                  verified.returncode == 0 and counted >= answered)


def soak_cluster(args: argparse.Namespace) -> bool:
    from gateway.ops.labcluster import ClusterLab

    lab = ClusterLab(f"soak{os.getpid() % 100000}", args.cluster, Path(tempfile.mkdtemp(prefix="soak-cluster-")),
                     gateway_settings={"request_head_timeout": HEAD_TIMEOUT})
    lab.down()
    upstream = None
    try:
        problems = lab.up()
        if problems:
            print("the lab did not come up: " + "; ".join(problems))
            return True
        upstream = start_lab_upstream(lab)
        seconds = args.minutes * 60
        clients = start_lab_clients(lab, args.clients, seconds)
        started = time.monotonic()
        rolled = []
        time.sleep(min(5.0, seconds / 4))  # traffic first, then the roll goes round while it lasts
        while time.monotonic() - started < seconds - 15:
            gw = lab.gateways[len(rolled) % len(lab.gateways)]
            step = time.monotonic()
            said = lab.roll(gw)
            rolled.append(gw)
            print(f"{step - started:5.1f}-{time.monotonic() - started:5.1f} s: {gw} drained and started again "
                  f"({said})", flush=True)
        outcomes = outcomes_of(clients, timeout=seconds + 120)
        elapsed = time.monotonic() - started
        wall_start = time.time() - elapsed
        cuts = Counter(f"{o['t'] - wall_start:.0f}" for o in outcomes if "id" not in o)
        print("requests cut, by second of the run: " + ", ".join(f"{t} s: {n}" for t, n in sorted(
            cuts.items(), key=lambda item: int(item[0]))))
        cosigned = lab.wait_cross_witnessed(60)
        peers = lab.state_dir / "peers.yaml"
        verified = verify("--peers", str(peers))
        logs = {gw: trace_records(lab.state_dir / gw / "state" / "trace") for gw in lab.gateways}
        print(f"{args.minutes:g} min, {args.clients} clients through HAProxy to {args.cluster} machines, "
              f"{len(rolled)} drain-and-restart steps ({Counter(rolled)})")
        print(f"(log size, cosigned size) per machine: {cosigned}")
        print(f"trace verify --peers ({verified.returncode}): {verified.stdout.strip() or verified.stderr.strip()}")
        whole = all(log == cosigned for log, cosigned in cosigned.values()) and "not yet cosigned" not in verified.stdout
        return report(outcomes, elapsed, logs, lab.state_dir / LAB_UPSTREAM_LOG, verified.returncode == 0 and whole)
    finally:
        if upstream:
            upstream.stop()
        lab.down()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="one gateway: its workers")
    parser.add_argument("--kill-every", type=float, default=20, help="one gateway: seconds between worker kills "
                                                                     "(0: none)")
    parser.add_argument("--cluster", type=int, default=0, metavar="N",
                        help="N gateway machines behind HAProxy in the namespace lab, restarted in turn")
    args = parser.parse_args()
    return 1 if (soak_cluster(args) if args.cluster else soak_one(args)) else 0


if __name__ == "__main__":
    sys.exit(main())
