"""Trace log throughput: durable records/s with group commit from 64 concurrent asyncio producers
(each answered only once its record and a signed checkpoint covering it are durable: one journal
write and fdatasync per batch), against a baseline of one commit per record measured in the same
run; the append latency at a steady load below saturation, and how far the checkpoint file (what a
C2SP client reads) trails the acknowledged records meanwhile; then records/s verified on one core
(in a process of its own, as the command line runs). First, the same steady load across --rotations
journal rotations: p99 in windows around the moment each new journal takes the old one's place, and
the time the switch took on the commit thread.

    .venv/bin/python bench/trace.py [--records 100000] [--producers 64] [--dir /var/tmp/...]
                                    [--remote-processes 2] [--rotations 3] [--only-rotations]

Longer than 400 lines: each run is a few small functions measuring one thing; split over files, the
one command printing figures of one run against each other would be lost.

Then the same through the machine's trace writer process (gateway.trace.remote, as the gateway runs
it with several workers): the 64 producers split over --remote-processes client processes, each
record answered only once durable; durable records/s against the in-process figure, and the
append latency there at the same steady load.

With --ceilings, what this machine allows whatever the disk: the same 64-producer runs with every
fsync and fdatasync made a no-op (nothing is durable: a diagnostic, in processes of their own), and
the floor of the producers alone (records built, encoded and handed over in bursts, futures answered
by the event loop, no log at all). If a ceiling is below a goal, no batching or disk can reach it.

The machine is shared: compare figures of one run with each other, and repeat runs.
"""

import argparse
import asyncio
import bisect
import multiprocessing
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from gateway.trace import TraceLog
from gateway.trace.audit import verify_log
from gateway.trace.log import encode_record
from gateway.trace.note import parse_vkey
from gateway.trace.remote import RemoteTraceLog
from gateway.trace.store import LogStore
from gateway.trace.tiles import JOURNAL_HEADER

ORIGIN = "bench.gateway/trace"


def record(i: int) -> dict:
    return {"v": 1, "id": f"bench-{i:08d}", "time": "2026-11-26T06:30:00.123Z", "frontend": "frontend-local",
            "listener": "forward", "client": {"addr": "127.0.0.1:5555", "zone": "extranet"},
            "upstream": {"host": "127.0.0.2", "addr": "127.0.0.2:8000", "zone": "internet"},
            "method": "POST", "url": "http://127.0.0.2:8000/x?sfzh=1101***", "status": 403,
            "req_bytes": 25, "resp_bytes": 0, "req_digest": "sha256:" + "ab" * 32,
            "resp_digest": "sha256:" + "cd" * 32, "decision": "block",
            "rules": [{"rule": "cn-id-outbound", "type": "cn_id_card", "action": "block", "count": 1,
                       "locations": ["body:$.sfzh"], "locations_sha256": "ae13c33e" + "0" * 56}],
            "grant": None, "error": None}


def bench_group_commit(base: Path, total: int, producers: int) -> tuple[float, list[float]]:
    log = TraceLog.open(base / "group", origin=ORIGIN, signing_key=base / "key")
    latencies: list[float] = []

    async def producer(p: int) -> None:
        for k in range(p, total, producers):
            t = time.perf_counter()
            await log.append(record(k))
            latencies.append(time.perf_counter() - t)

    async def main() -> None:
        await asyncio.gather(*(producer(p) for p in range(producers)))

    start = time.perf_counter()
    asyncio.run(main())
    elapsed = time.perf_counter() - start
    assert log.tree_size == total
    log.close()
    return total / elapsed, latencies


def paced_appends(log: TraceLog | RemoteTraceLog, producers: int, rate: float, seconds: float,
                  first: int = 0, step: int = 1, starts: list[float] | None = None) -> list[float]:
    """Latencies of appends at a steady offered load: `producers` tasks each appending every
    producers/rate seconds (record numbers first, first + step, ...); each append's start time
    (perf_counter) goes to `starts` if given."""
    latencies: list[float] = []
    period = producers / rate

    async def producer(p: int) -> None:
        await asyncio.sleep(period * p / producers)
        k = first + p * step
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            await log.append(record(k))
            latencies.append(time.perf_counter() - t)
            if starts is not None:
                starts.append(t)
            k += producers * step
            await asyncio.sleep(max(0.0, period - (time.perf_counter() - t)))

    async def main() -> None:
        await asyncio.gather(*(producer(p) for p in range(producers)))

    asyncio.run(main())
    return latencies


def latency_figures(latencies: list[float], seconds: float) -> tuple[float, float, float]:
    """(appends/s, p50 ms, p99 ms)"""
    latencies = sorted(latencies)
    return (len(latencies) / seconds, statistics.median(latencies) * 1e3,
            latencies[int(len(latencies) * 0.99)] * 1e3)


def _sample_checkpoint_file(log: TraceLog, path: Path, samples: list[tuple[float, int, int]],
                            stop: threading.Event) -> None:
    """(time, records acknowledged, tree size of the checkpoint file) every millisecond."""
    while not stop.wait(0.001):
        now, acknowledged = time.perf_counter(), log.tree_size
        try:
            size = int(path.read_bytes().split(b"\n")[1])
        except (OSError, IndexError, ValueError):
            continue
        samples.append((now, acknowledged, size))


def checkpoint_file_lag(samples: list[tuple[float, int, int]]) -> tuple[float, float, float, float]:
    """(p99, max) records acknowledged but not in the checkpoint file, (p99, max) ms since the
    first of them was acknowledged (as far as the 1 ms samples tell)."""
    behind, ages = [], []
    acknowledged_then = [acked for _, acked, _ in samples]  # never decreases
    for now, acknowledged, size in samples:
        behind.append(max(0, acknowledged - size))
        first_past = bisect.bisect_right(acknowledged_then, size)  # first sample with records past the file
        ages.append((now - min(now, samples[first_past][0] if first_past < len(samples) else now)) * 1e3)
    behind.sort()
    ages.sort()
    return behind[int(len(behind) * 0.99)], behind[-1], ages[int(len(ages) * 0.99)], ages[-1]


def bench_paced_latency(base: Path, producers: int, rate: float,
                        seconds: float) -> tuple[tuple[float, float, float], tuple[float, float, float, float]]:
    """Added latency of an append at a steady offered load below saturation (what a transfer pays),
    and how far the checkpoint file trails the acknowledged records meanwhile (checkpoint_file_lag)."""
    log = TraceLog.open(base / "paced", origin=ORIGIN, signing_key=base / "key")
    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_checkpoint_file, args=(log, base / "paced" / "checkpoint", samples, stop))
    sampler.start()
    try:
        latencies = paced_appends(log, producers, rate, seconds)
    finally:
        stop.set()
        sampler.join()
        log.close()
    return latency_figures(latencies, seconds), checkpoint_file_lag(samples)


def _watch_rotations(journal: Path, switches: list[float], stop: threading.Event) -> None:
    """Times (perf_counter) at which the journal's header names a new first record: a rotation."""
    seen = None
    while not stop.wait(0.002):
        try:
            with journal.open("rb") as f:
                start = JOURNAL_HEADER.unpack(f.read(JOURNAL_HEADER.size))[1]
        except (OSError, struct.error):
            continue
        if seen is not None and start != seen:
            switches.append(time.perf_counter())
        seen = start


ROTATION_WINDOWS = [(-2.0, -1.0), (-1.0, -0.5), (-0.5, 0.0), (0.0, 0.5), (0.5, 1.0)]  # seconds around a switch


def bench_rotations(base: Path, producers: int, rate: float,
                    rotations: int) -> tuple[list[list[tuple[int, float]]], tuple[float, float, float], list[float]]:
    """Appends at a steady `rate` across `rotations` journal rotations (every ROTATE_BUNDLES * 256
    records): for each rotation, (appends, p99 ms) in ROTATION_WINDOWS around the moment the new
    journal took the old one's place (by the appends' start times); the figures of the whole run;
    and the ms each switch to the new journal took on the commit thread (LogStore._switch_journal)."""
    switch_ms: list[float] = []
    switch_journal = LogStore._switch_journal

    def timed_switch(store: LogStore, *args: object) -> None:
        t = time.perf_counter()
        switch_journal(store, *args)
        switch_ms.append((time.perf_counter() - t) * 1e3)

    LogStore._switch_journal = timed_switch  # measured from outside: the store is unchanged
    log = TraceLog.open(base / "rotation", origin=ORIGIN, signing_key=base / "key")
    latencies: list[float] = []
    starts: list[float] = []
    switches: list[float] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_rotations, args=(base / "rotation" / "journal", switches, stop))
    watcher.start()
    began = time.perf_counter()
    try:
        # One second at a time until a second past the last rotation (the rate reached may be below the offered one).
        while len(switches) < rotations or time.perf_counter() - switches[rotations - 1] < ROTATION_WINDOWS[-1][1]:
            latencies += paced_appends(log, producers, rate, 1.0, first=len(latencies), starts=starts)
        seconds = time.perf_counter() - began
    finally:
        stop.set()
        watcher.join()
        log.close()
        LogStore._switch_journal = switch_journal
    windows = []
    for switch in switches[:rotations]:
        row = []
        for lo, hi in ROTATION_WINDOWS:
            part = sorted(lat for t, lat in zip(starts, latencies) if switch + lo <= t < switch + hi)
            row.append((len(part), part[int(len(part) * 0.99)] * 1e3 if part else float("nan")))
        windows.append(row)
    return windows, latency_figures(latencies, seconds), switch_ms[:rotations]


def bench_one_fsync_per_record(base: Path, total: int) -> float:
    log = TraceLog.open(base / "single", origin=ORIGIN, signing_key=base / "key")
    start = time.perf_counter()
    for k in range(total):
        log.append_sync(record(k))
    elapsed = time.perf_counter() - start
    log.close()
    return total / elapsed


def _remote_producers(socket_path: Path, first: int, step: int, total: int, producers: int,
                      paced: tuple[float, float] | None, start: multiprocessing.Event,
                      done: multiprocessing.Queue) -> None:
    """One client process (a gateway worker's share): `producers` tasks appending every `step`-th
    record, as fast as they can (`total` records), or `paced` = (records/s, seconds)."""
    client = RemoteTraceLog.connect(socket_path)
    assert client.failure is None, client.failure

    async def producer(p: int) -> None:
        for k in range(first + p * step, total, producers * step):
            await client.append(record(k))

    async def main() -> None:
        await asyncio.gather(*(producer(p) for p in range(producers)))

    start.wait()
    if paced:
        latencies = paced_appends(client, producers, paced[0], paced[1], first, step)
    else:
        asyncio.run(main())
        latencies = []
    done.put((client.records_appended, latencies))
    client.close()


# Run first by a process measuring a ceiling: its fsync and fdatasync become no-ops (a diagnostic,
# never a durable log).
NO_DISK_WAITS = "import os; os.fsync = os.fdatasync = lambda fd: None"


def bench_remote(base: Path, total: int, producers: int, processes: int,
                 paced: tuple[float, float] | None = None, writer_prelude: str = "") -> tuple[float, list[float]]:
    """Through the writer process, from `processes` clients sharing `producers` tasks: durable
    records/s of `total` records, or the latencies at `paced` = (records/s offered, seconds).
    `writer_prelude` is Python the writer runs first (NO_DISK_WAITS for the ceiling)."""
    base.mkdir(exist_ok=True)
    socket_path = base / "writer.sock"
    writer = subprocess.Popen([sys.executable, "-c", f"{writer_prelude}\nfrom gateway.trace.remote import main; "
                               "raise SystemExit(main())", "--dir", str(base / "remote"),
                               "--origin", ORIGIN, "--key", str(base / "key"), "--socket", str(socket_path)])
    try:
        while not socket_path.exists():
            assert writer.poll() is None, "trace writer did not start"
            time.sleep(0.02)
        spawn = multiprocessing.get_context("spawn")
        start, done = spawn.Event(), spawn.Queue()
        share = None if paced is None else (paced[0] / processes, paced[1])
        clients = [spawn.Process(target=_remote_producers,
                                 args=(socket_path, c, processes, total, producers // processes, share, start, done))
                   for c in range(processes)]
        for client in clients:
            client.start()
        time.sleep(2.0)  # every client connected and idle
        began = time.perf_counter()
        start.set()
        results = [done.get(timeout=600) for _ in clients]
        elapsed = time.perf_counter() - began
        for client in clients:
            client.join()
        appended = sum(count for count, _ in results)
        assert paced or appended == total, (appended, total)
        return appended / elapsed, [latency for _, part in results for latency in part]
    finally:
        writer.terminate()
        writer.wait(30)


def producers_alone(total: int, producers: int) -> float:
    """Records/s of the producers' own share: build and encode a record, hand it over in a burst
    per event-loop iteration, await a future answered in that burst; no log, no thread."""
    pending: list[asyncio.Future] = []

    def answer() -> None:
        for leaf, waiter in enumerate(pending):
            waiter.set_result(leaf)
        pending.clear()

    async def producer(p: int) -> None:
        loop = asyncio.get_running_loop()
        for k in range(p, total, producers):
            encode_record(record(k))
            if not pending:
                loop.call_soon(answer)
            waiter = loop.create_future()
            pending.append(waiter)
            await waiter

    async def main() -> None:
        await asyncio.gather(*(producer(p) for p in range(producers)))

    start = time.perf_counter()
    asyncio.run(main())
    return total / (time.perf_counter() - start)


def _ceiling_in_process(base: Path, total: int, producers: int) -> float:
    exec(NO_DISK_WAITS)
    base.mkdir()
    return bench_group_commit(base, total, producers)[0]


def _ceiling_through_writer(base: Path, total: int, producers: int, processes: int) -> float:
    return bench_remote(base, total, producers, processes, writer_prelude=NO_DISK_WAITS)[0]


def bench_ceilings(base: Path, total: int, producers: int, processes: int) -> tuple[float, float, float]:
    """(producers alone, in process without disk waits, through the writer without disk waits),
    each in a fresh process."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn, max_tasks_per_child=1) as pool:
        alone = pool.submit(producers_alone, total, producers).result()
    with ProcessPoolExecutor(1, mp_context=spawn, max_tasks_per_child=1) as pool:
        in_process = pool.submit(_ceiling_in_process, base / "ceiling", total, producers).result()
    through_writer = 0.0
    if processes:
        through_writer = _ceiling_through_writer(base / "ceiling-remote", total, producers, processes)
    return alone, in_process, through_writer


def _verify_rate(base: Path) -> tuple[float, int]:
    verifier = parse_vkey((base / "key.pub").read_text())
    start = time.perf_counter()
    report = verify_log(base / "group", verifier)
    elapsed = time.perf_counter() - start
    assert report.ok, report.problems
    return report.records / elapsed, report.records


def bench_verify(base: Path) -> tuple[float, int]:
    """Records/s of verify_log in a process of its own, as `gateway trace verify` runs: here, after
    the runs above, the garbage collector would scan their leftovers again and again (measured
    with 300,000 containers left over: 205,000-220,000 records/s against 346,000-366,000)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_verify_rate, base).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--producers", type=int, default=64)
    parser.add_argument("--baseline-records", type=int, default=2_000)
    parser.add_argument("--paced-rate", type=float, default=5_000, help="offered records/s for the latency run")
    parser.add_argument("--dir", type=Path, default=None, help="parent directory (default: a temp dir on /var/tmp)")
    parser.add_argument("--remote-processes", type=int, default=2,
                        help="client processes sharing the producers in the trace-writer run (0: skip it)")
    parser.add_argument("--rotations", type=int, default=3,
                        help="journal rotations to pass at the paced rate, p99 printed around each (0: skip)")
    parser.add_argument("--only-rotations", action="store_true", help="run the rotation run alone")
    parser.add_argument("--ceilings", action="store_true",
                        help="also measure what the machine allows without any disk wait (see above)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="trace-bench-", dir=args.dir or "/var/tmp"))
    try:
        if args.rotations:
            windows, whole, switch_ms = bench_rotations(base, args.producers, args.paced_rate, args.rotations)
            print(f"across {len(windows)} journal rotation(s) at {whole[0]:,.0f} records/s ({args.paced_rate:,.0f} "
                  f"offered) by {args.producers} producers: p50 {whole[1]:.2f} ms p99 {whole[2]:.2f} ms over the run")
            print("  p99 ms (appends) by window around the switch to the new journal: "
                  + "  ".join(f"[{lo:+.1f},{hi:+.1f})s" for lo, hi in ROTATION_WINDOWS))
            for n, (row, ms) in enumerate(zip(windows, switch_ms), 1):
                print(f"  rotation {n}: " + "  ".join(f"{p99:7.2f} ({count:5d})" for count, p99 in row)
                      + f"   switch on the commit thread {ms:.2f} ms")
            if args.only_rotations:
                return
        baseline = bench_one_fsync_per_record(base, args.baseline_records)
        group, latencies = bench_group_commit(base, args.records, args.producers)
        verified, count = bench_verify(base)
        (paced, paced_p50, paced_p99), lag = bench_paced_latency(base, args.producers, args.paced_rate, 3.0)
        if args.remote_processes:
            remote = bench_remote(base, args.records, args.producers, args.remote_processes)[0]
            shutil.rmtree(base / "remote")
            remote_paced = latency_figures(bench_remote(base, 0, args.producers, args.remote_processes,
                                                        (args.paced_rate, 3.0))[1], 3.0)
        if args.ceilings:
            ceilings = bench_ceilings(base, args.records, args.producers, args.remote_processes)
        latencies.sort()
        p50 = statistics.median(latencies) * 1e3
        p99 = latencies[int(len(latencies) * 0.99)] * 1e3
        print(f"baseline, one fsync'd commit per record: {baseline:,.0f} records/s ({args.baseline_records} records)")
        print(f"group commit, {args.producers} producers:        {group:,.0f} durable records/s "
              f"({args.records} records), append latency p50 {p50:.2f} ms p99 {p99:.2f} ms")
        print(f"ratio group/baseline:                    {group / baseline:.1f}x  (goal: >= 50,000 records/s)")
        print(f"added latency at {paced:,.0f} records/s offered by {args.producers} producers: "
              f"p50 {paced_p50:.2f} ms p99 {paced_p99:.2f} ms  (goal: p99 <= 5 ms)")
        print(f"  checkpoint file behind the acknowledged records there: p99 {lag[0]:.0f} max {lag[1]:.0f} records, "
              f"p99 {lag[2]:.1f} ms max {lag[3]:.1f} ms since the oldest of them was acknowledged")
        print(f"verify (one core):                       {verified:,.0f} records/s ({count} records)"
              f"  (goal: >= 200,000 records/s)")
        if args.remote_processes:
            print(f"trace writer process, {args.producers} producers in {args.remote_processes} client processes: "
                  f"{remote:,.0f} durable records/s ({args.records} records); ratio to in-process group commit "
                  f"{remote / group:.2f}x")
            print(f"  added latency there at {remote_paced[0]:,.0f} records/s offered: p50 {remote_paced[1]:.2f} ms "
                  f"p99 {remote_paced[2]:.2f} ms")
        if args.ceilings:
            alone, in_process, through_writer = ceilings
            print(f"ceilings, every fsync a no-op (NOT durable, diagnostic): in process {in_process:,.0f} records/s "
                  f"({in_process / group:.2f}x the durable run)"
                  + (f", through the writer process {through_writer:,.0f} ({through_writer / remote:.2f}x)"
                     if args.remote_processes else ""))
            print(f"  the {args.producers} producers alone (build, encode, hand over, await; no log): "
                  f"{alone:,.0f} records/s")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
