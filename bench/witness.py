"""Cross-witness traffic and cost (docs/scale.md): what one push of a machine's checkpoint to another
machine's witness (gateway.ops.crosswitness, C2SP tlog-witness) sends, gets back and costs in CPU, as
the log grows. The baseline is the re-push of a checkpoint the witness already holds (what an idle log
sends every interval), measured in the same run; a push after the log grew carries a consistency proof
and reads the journal's tail.

    .venv/bin/python bench/witness.py [--sizes 1024,2048,4096,8192,16384] [--grow 37] [--rounds 5]

Log and witness run in this one process on loopback, so CPU is both sides together. The machine is
shared: compare figures of one run with each other.
"""

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from pathlib import Path

from gateway.trace import TraceLog
from gateway.trace import witness as witness_module
from gateway.trace.audit import newest_checkpoint
from gateway.trace.note import SIG_COSIGNATURE_V1, Signer, parse_vkey
from gateway.trace.witness import WitnessConfig, WitnessState, push_checkpoint, serve

ORIGIN = "bench.boundary/gw1/trace"
RECORD = {"v": 1, "id": "", "time": "2026-12-04T08:00:00.000Z", "listener": "boundary",
          "client": {"addr": "198.18.10.2", "zone": "extranet"}, "upstream": {"host": "198.18.30.2", "zone": "internet"},
          "request": {"method": "GET", "url": "http://198.18.30.2:8000/政务/数据?id=***", "bytes": 0},
          "response": {"status": 200, "bytes": 29}, "decision": "allow", "rules": []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1024,2048,4096,8192,16384", help="log sizes (records) to push at")
    parser.add_argument("--grow", type=int, default=37, help="records appended between two pushes")
    parser.add_argument("--rounds", type=int, default=5, help="pushes measured per size and kind")
    args = parser.parse_args()

    sent: list[tuple[int, int]] = []
    post = witness_module._post

    def counting_post(url: str, body: bytes) -> tuple[int, str]:
        status, text = post(url, body)
        sent.append((len(body), len(text.encode())))
        return status, text

    witness_module._post = counting_post
    base = Path(tempfile.mkdtemp(prefix="bench-witness-"))
    log = TraceLog.open(base / "log", origin=ORIGIN, signing_key=base / "key")
    verifier = parse_vkey((base / "key.pub").read_text())
    signer = Signer.generate("bench.boundary/gw2/witness", SIG_COSIGNATURE_V1)
    server = serve(("127.0.0.1", 0), WitnessState(base / "witness", {ORIGIN: verifier}, signer))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    witness = WitnessConfig(f"http://127.0.0.1:{server.server_address[1]}", signer.verifier.vkey())

    def push() -> tuple[float, int, int]:
        cpu = time.process_time()
        push_checkpoint(base / "log", verifier, witness)
        return time.process_time() - cpu, *sent[-1]

    print(f"{'records':>8} {'kind':>10} {'request B':>10} {'answer B':>9} {'CPU ms':>8} {'× re-push':>10}")
    total = 0
    for size in (int(s) for s in args.sizes.split(",")):
        total = append(log, total, size - total)
        push()
        again = [push() for _ in range(args.rounds)]
        grown = []
        for _ in range(args.rounds):
            total = append(log, total, args.grow)
            newest_checkpoint(base / "log", verifier)  # the checkpoint covering the new records is durable
            grown.append(push())
        baseline = statistics.median(cpu for cpu, _, _ in again)
        for kind, runs in (("re-push", again), (f"+{args.grow}", grown)):
            cpu = statistics.median(c for c, _, _ in runs)
            print(f"{total:>8} {kind:>10} {max(r for _, r, _ in runs):>10} {max(a for _, _, a in runs):>9} "
                  f"{cpu * 1000:>8.1f} {cpu / baseline:>9.1f}×")
    log.close()
    server.shutdown()


def append(log: TraceLog, start: int, count: int) -> int:
    async def run() -> None:
        await asyncio.gather(*(log.append({**RECORD, "id": f"t-{i}"}) for i in range(start, start + count)))
    asyncio.run(run())
    return start + count


if __name__ == "__main__":
    main()
