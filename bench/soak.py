"""Soak benchmark: `kompressor serve` at a fixed request rate for a long time, with hot swaps, on loopback.

    python bench/soak.py                          # 600 s at 100 requests/s, a swap every 60 s
    python bench/soak.py --seconds 180 --rate 50 --workers 2 --max-batch-size 16

An open-loop generator sends request i at start + i / rate whatever the answers do (so a slow server shows up as
latency, not as a lower rate: latency is measured from the scheduled send time), on up to ``--connections``
keep-alive connections. Every ``--swap-every`` seconds the server is hot-swapped to the other of two revisions.
Every answer is checked against a direct ONNX Runtime run of the revision it names. The capture is on, and at the
end the rows it wrote, dropped (counted) and still holds are checked against the rows served.

Reported (JSON on stdout, and ``--out``): requests sent, failed (non-200, connection errors, wrong answers), swaps,
p50/p99/max latency, the achieved rate, RSS of the server's process tree at the end of the warm-up and at the end
(and its peak), and the capture's rows served / written / dropped / on disk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LAYERS = (64, 256, 256, 10)
WARMUP_FRACTION = 0.1  # RSS "start" is sampled once this share of the run is over


def make_artifact(folder: Path, seed: int, revision: int) -> Path:
    """An MLP (Gemm + Relu) with random weights, built op by op (no torch needed)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from kompressor.store import write_manifest

    rng = np.random.default_rng(seed)
    nodes, inits, name = [], [], "input"
    for i, (a, b) in enumerate(zip(LAYERS, LAYERS[1:])):
        inits += [numpy_helper.from_array((rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.normal(size=b).astype(np.float32) * 0.1, f"b{i}")]
        out = "logits" if i == len(LAYERS) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [name, f"w{i}", f"b{i}"], [out if out == "logits" else f"g{i}"]))
        if out != "logits":
            nodes.append(helper.make_node("Relu", [f"g{i}"], [out]))
        name = out
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                           ["batch", LAYERS[0]])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", LAYERS[-1]])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    write_manifest(folder, {"revision": revision})
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(pid: int) -> int:
    """RSS in bytes of a process and its children (the --workers supervisor and its workers)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in open(f"/proc/{p}/task/{task}/children").read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def metric(text: str, name: str) -> float:
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith(name) and line[len(name)] in "{ ")


async def soak(args, url: str, pid: int, artifacts: dict, expected: dict, x: np.ndarray) -> dict:
    import aiohttp

    payload = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                      "data": x.reshape(-1).tolist()}]}).encode()
    infer = f"{url}/v2/models/soak/infer"
    latencies, failures, versions = [], [], {}
    rss = {"peak": 0}
    total = int(args.seconds * args.rate)
    connector = aiohttp.TCPConnector(limit=args.connections)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def one(scheduled: float):
            try:
                async with client.post(infer, data=payload, headers={"Content-Type": "application/json"}) as r:
                    body = await r.json()
                    if r.status != 200:
                        failures.append(f"HTTP {r.status}: {str(body)[:200]}")
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as err:
                failures.append(f"{type(err).__name__}: {err}")
                return
            latencies.append(loop.time() - scheduled)
            version = body["model_version"]
            versions[version] = versions.get(version, 0) + 1
            got = np.asarray(body["outputs"][0]["data"], np.float32).reshape(expected[version].shape)
            if not np.array_equal(got, expected[version]):
                failures.append(f"wrong answer from version {version}")

        async def swapper():
            swaps, revision = [], 1
            while True:
                await asyncio.sleep(args.swap_every)
                revision = 3 - revision
                folder = artifacts[revision]
                sha = json.loads((folder / "manifest.json").read_text())["files"]["model.onnx"]
                async with client.post(f"{url}/v2/repository/models/soak/load",
                                       json={"parameters": {"artifact": str(folder), "sha256": sha}}) as r:
                    swaps.append(r.status)
                    if r.status != 200:
                        failures.append(f"swap HTTP {r.status}: {(await r.text())[:200]}")
                rss["swaps"] = swaps

        async def sampler():
            while True:
                await asyncio.sleep(1)
                value = tree_rss(pid)
                rss["peak"] = max(rss["peak"], value)
                if "start" not in rss and loop.time() - start >= WARMUP_FRACTION * args.seconds:
                    rss["start"] = value

        helpers = [asyncio.create_task(sampler())]
        if args.swap_every > 0:
            helpers.append(asyncio.create_task(swapper()))
        tasks = []
        for i in range(total):
            scheduled = start + i / args.rate
            await asyncio.sleep(max(0.0, scheduled - loop.time()))
            tasks.append(asyncio.create_task(one(scheduled)))
            if len(tasks) >= 4096:  # keep the task list small over 10 minutes
                tasks = [t for t in tasks if not t.done()]
        await asyncio.gather(*tasks)
        elapsed = loop.time() - start
        for helper in helpers:
            helper.cancel()
        rss["end"] = tree_rss(pid)
        async with client.get(f"{url}/metrics") as r:
            metrics_text = await r.text()
    lat = np.asarray(latencies) * 1000
    return {
        "seconds": round(elapsed, 1), "rate_target": args.rate, "requests": total,
        "rate_achieved": round(len(latencies) / elapsed, 1), "failed": len(failures), "failures": failures[:10],
        "answers_by_version": versions, "swaps": rss.get("swaps", []),
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
                       "p99": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
                       "max": round(float(lat.max()), 2) if len(lat) else None},
        "rss_mib": {k: round(rss[k] / 2 ** 20, 1) for k in ("start", "end", "peak") if k in rss},
        "metrics": metrics_text,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--rate", type=float, default=100, help="requests per second (open loop)")
    parser.add_argument("--batch", type=int, default=4, help="rows per request")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--swap-every", type=float, default=60, help="seconds between hot swaps (0: none)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=0, help="dynamic batching (0: off)")
    parser.add_argument("--out", help="also write the JSON summary here")
    args = parser.parse_args()

    from kompressor_jobs import capture

    work = Path(tempfile.mkdtemp(prefix="kompressor-soak-"))
    artifacts = {r: make_artifact(work / f"r{r}", seed=r, revision=r) for r in (1, 2)}
    x = np.random.default_rng(0).normal(size=(args.batch, LAYERS[0])).astype(np.float32)
    import onnxruntime as ort

    expected = {}
    for r, folder in artifacts.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        expected[str(r)] = session.run(None, {"input": x})[0]
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KOMPRESSOR_ORT_THREADS": os.environ.get("KOMPRESSOR_ORT_THREADS",
                                                                                       "1")}
    argv = [sys.executable, "-m", "kompressor.cli", "--json-logs", "serve", "--artifact", str(artifacts[1]),
            "--name", "soak", "--host", "127.0.0.1", "--port", str(port), "--capture", str(work / "capture"),
            "--workers", str(args.workers), "--max-batch-size", str(args.max_batch_size)]
    log = open(work / "server.log", "wb")
    server = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"server did not start: {(work / 'server.log').read_text()[-2000:]}")
                time.sleep(0.2)
        result = asyncio.run(soak(args, url, server.pid, artifacts, expected, x))
        text = result.pop("metrics")
        served = metric(text, "kompressor_inference_batch_size_sum")
        deadline = time.monotonic() + 30
        while True:  # the capture writer gathers rows for up to 50 ms: let it catch up
            with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
                text = r.read().decode()
            kept = metric(text, "kompressor_capture_rows_total")
            if kept >= served or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        rows, _ = capture.read_since(work / "capture", capture.Position())
        dropped = int(metric(text, "kompressor_capture_dropped_rows_total"))
        on_disk = 0 if rows is None else len(rows)
        result["capture"] = {"rows_served": int(served), "rows_written": int(kept), "rows_dropped": dropped,
                             "rows_on_disk_now": on_disk,
                             "nothing_lost_unsaid": int(served) == int(kept) and on_disk == int(kept) - dropped,
                             "note": "dropped: counted in kompressor_capture_dropped_rows_total (the size cap, "
                                     "--capture-max-bytes 64 MiB, deletes the oldest segments)"}
        result["settings"] = {"workers": args.workers, "max_batch_size": args.max_batch_size, "batch": args.batch,
                              "connections": args.connections, "swap_every": args.swap_every,
                              "model": f"MLP {'-'.join(map(str, LAYERS))}", "cpus": os.cpu_count(),
                              "loadavg_end": os.getloadavg()}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    out = json.dumps(result, indent=2)
    print(out)
    if args.out:
        Path(args.out).write_text(out + "\n")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
