"""Mirroring benchmark: what shadowing and a 10 % canary cost the clients of `kompressor serve`, against `direct`.

    python bench/mirroring.py                 # about 4 minutes on 2 cores
    python bench/mirroring.py --write-docs    # also write its section of docs/benchmarks/serving.md
    python bench/mirroring.py --seconds 3 --rounds 2   # a quick look

One server process (one worker, ORT on one thread: what an online stage runs) serves an MLP (64 → 256 → 256 → 10,
random weights) with a second one of the same shape as the candidate. The candidate is set and removed on the
running server between cells (``POST``/``DELETE /v2/repository/models/{name}/candidate``), so every mode runs on the
same warmed process; cells are interleaved (direct, shadow, canary; again ``--rounds`` times) so load from other
processes falls on all alike. Each cell is a closed loop of ``--connections`` keep-alive clients sending one-row
OIP v2 REST requests for ``--seconds``; latency is measured by the client (aiohttp, in this process) from send to
answer. Reported per mode and connection count: requests, p50 and p99 over all rounds, their ratio to direct's,
and the mirrored copies dropped (shadow: the queue was full).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_sections import write_section  # noqa: E402
from soak import LAYERS, free_port, make_artifact  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks" / "serving.md"
BEGIN, END = "<!-- mirroring: begin (bench/mirroring.py --write-docs) -->", "<!-- mirroring: end -->"
MODES = ("direct", "shadow", "canary")


async def cell(url: str, body: bytes, connections: int, seconds: float) -> list[float]:
    import aiohttp

    latencies: list[float] = []
    stop = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as http:
        async def client():
            while time.perf_counter() < stop:
                started = time.perf_counter()
                async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
                    await response.read()
                    if response.status != 200:
                        raise SystemExit(f"HTTP {response.status}")
                latencies.append((time.perf_counter() - started) * 1000)

        await asyncio.gather(*(client() for _ in range(connections)))
    return latencies


def call(method: str, url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"{}")


def set_mode(base: str, mode: str, candidate: Path) -> None:
    if mode == "direct":
        call("DELETE", f"{base}/v2/repository/models/bench/candidate")
        return
    call("POST", f"{base}/v2/repository/models/bench/candidate", {"parameters": {
        "artifact": str(candidate), "mode": mode, "weight": 10 if mode == "canary" else 0}})


def dropped(base: str) -> int:
    evidence = call("GET", f"{base}/v2/models/bench/online")
    return int((evidence.get("candidate") or {}).get("dropped", 0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per cell")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kompressor-mirroring-"))
    serving, candidate = make_artifact(work / "r1", seed=1, revision=1), make_artifact(work / "r2", seed=2,
                                                                                        revision=2)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KOMPRESSOR_ORT_THREADS": "1"}
    argv = [sys.executable, "-m", "kompressor.cli", "--json-logs", "serve", "--artifact", str(serving), "--name",
            "bench", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = open(work / "server.log", "wb")
    server = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
    base = f"http://127.0.0.1:{port}"
    x = np.random.default_rng(0).normal(size=(1, LAYERS[0])).astype(np.float32)
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, LAYERS[0]], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    results: dict[tuple[str, int], list[float]] = {}
    drops: dict[tuple[str, int], int] = {}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if call("GET", f"{base}/v2/health/ready").get("ready"):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"server did not start: {(work / 'server.log').read_text()[-2000:]}")
                time.sleep(0.2)
        load = os.getloadavg()[0]
        for connections in args.connections:
            asyncio.run(cell(f"{base}/v2/models/bench/infer", body, connections, 1.0))  # warm-up
            for _ in range(args.rounds):
                for mode in MODES:
                    set_mode(base, mode, candidate)
                    got = asyncio.run(cell(f"{base}/v2/models/bench/infer", body, connections, args.seconds))
                    results.setdefault((mode, connections), []).extend(got)
                    if mode == "shadow":
                        drops[(mode, connections)] = drops.get((mode, connections), 0) + dropped(base)
    finally:
        server.terminate()
        server.wait(30)

    lines = [f"Load average at the start: {load:.2f} ({os.cpu_count()} CPUs). {args.rounds} rounds of "
             f"{args.seconds:g} s cells, one-row requests, one worker, ORT on one thread.", "",
             "| connections | mode | requests | p50 ms | p99 ms | p50 vs direct | p99 vs direct | mirrored copies "
             "dropped |", "|---|---|---|---|---|---|---|---|"]
    for connections in args.connections:
        direct = np.array(results[("direct", connections)])
        for mode in MODES:
            lat = np.array(results[(mode, connections)])
            p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
            ratio50, ratio99 = p50 / np.percentile(direct, 50), p99 / np.percentile(direct, 99)
            lost = drops.get((mode, connections), "") if mode == "shadow" else ""
            lines.append(f"| {connections} | {mode} | {len(lat)} | {p50:.3f} | {p99:.3f} | {ratio50:.3f}× | "
                         f"{ratio99:.3f}× | {lost} |")
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        section = ("## Online stage: the cost of mirroring\n\n`python bench/mirroring.py --write-docs` "
                   f"(target: shadow ≤ 1.05× direct at p50).\n\n{table}")
        write_section(DOC, BEGIN, END, section, title="# Serving benchmarks")
        print(f"{DOC.relative_to(ROOT)}: written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
