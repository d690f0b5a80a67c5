"""Operator latency and memory on the real control plane of e2e/cluster (kube-apiserver, etcd,
controller-manager, scheduler from the Kubernetes Go modules), the counterpart of bench/operator.py
(which measures against the loopback emulator).

For each size: a fresh control plane (no Nodes: the Job controller's Pods stay Pending, nothing runs),
the real `kompressor operator` process (cluster-wide, standalone) logged in with the admin kubeconfig,
N CompressedModels created 32 at a time. Latency = the moment the create call returned -> the moment a
watch on Jobs delivered the model's pruning Job (both taken here, so watch delivery is included). The
operator's RSS is read once every Job exists and the API has been quiet for a while.

    python bench/operator_real.py [--sizes 200 1000] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "e2e" / "cluster"))
sys.path.insert(0, str(REPO / "tests"))

import kubelet as k  # noqa: E402  (e2e/cluster/kubelet.py: its small API client)
import local  # noqa: E402  (e2e/cluster/local.py)

from kompressor.core import names  # noqa: E402
from support.cluster import digits_model  # noqa: E402
from support.net import free_port  # noqa: E402

CONCURRENCY = 32


def percentile(values: list[float], q: float) -> float:
    """numpy's percentile (linear interpolation), as bench/operator.py computes it."""
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def measure(n: int, workdir: Path) -> dict:
    cluster = local.LocalCluster(workdir / "cluster", with_kubelet=False)
    await asyncio.to_thread(cluster.start)
    operator = None
    try:
        api = k.Api(cluster.kubeconfig, workdir / "credentials")
        namespace = f"bench-{n}"
        await api.request("POST", "/api/v1/namespaces", body={"metadata": {"name": namespace}})
        liveness = free_port()
        env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "KOMPRESSOR_PVC_ROOT": str(workdir / "pvc")}
        log = open(workdir / "operator.log", "wb")
        operator = subprocess.Popen(
            [sys.executable, "-m", "kompressor.cli", "--json-logs", "operator", "-A", "--standalone",
             "--artifact-store", "pvc://kompressor-artifacts/store", "--liveness",
             f"http://127.0.0.1:{liveness}/healthz"], env=env, stdout=log, stderr=subprocess.STDOUT)
        await _until_alive(operator, liveness)

        jobs_seen: dict[str, float] = {}
        created: dict[str, float] = {}
        wanted = {names.job_name(f"m{i}", "prune", 1, 1): f"m{i}" for i in range(n)}
        watching = asyncio.Event()
        watcher = asyncio.create_task(_watch_jobs(api, namespace, wanted, jobs_seen, watching))
        await watching.wait()

        sem = asyncio.Semaphore(CONCURRENCY)

        async def create(i: int) -> None:
            body = digits_model(f"m{i}", namespace)
            async with sem:
                await api.request("POST", f"/apis/kompressor.io/v1alpha1/namespaces/{namespace}/compressedmodels",
                                  body=body)
                created[f"m{i}"] = time.monotonic()

        started = time.monotonic()
        cpu_before = _cpu(operator.pid)
        await asyncio.gather(*(create(i) for i in range(n)))
        deadline = time.monotonic() + 900
        while len(jobs_seen) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        all_jobs = time.monotonic() - started
        assert len(jobs_seen) == n, f"only {len(jobs_seen)} of {n} pruning Jobs after 900 s"
        latencies = [jobs_seen[m] - created[m] for m in created]
        await asyncio.sleep(10)  # settle (status echoes, events) before reading memory
        row = {"n": n, "p50": percentile(latencies, 50), "p95": percentile(latencies, 95), "max": max(latencies),
               "all_jobs_s": all_jobs, "rss_mb": rss_mb(operator.pid), "operator_cpu_s": _cpu(operator.pid) - cpu_before}
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await api.close()
        return row
    finally:
        if operator is not None and operator.poll() is None:
            operator.send_signal(signal.SIGTERM)
            try:
                operator.wait(30)
            except subprocess.TimeoutExpired:
                operator.kill()
        await asyncio.to_thread(cluster.stop)


async def _until_alive(operator: subprocess.Popen, port: int) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            if operator.poll() is not None:
                raise RuntimeError(f"the operator exited with {operator.returncode}")
            try:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("the operator never became alive")


async def _watch_jobs(api, namespace: str, wanted: dict, seen: dict, watching: asyncio.Event) -> None:
    path = f"/apis/batch/v1/namespaces/{namespace}/jobs"
    while True:
        listed = await api.get(path)
        for job in listed["items"]:
            if job["metadata"]["name"] in wanted:
                seen.setdefault(wanted[job["metadata"]["name"]], time.monotonic())
        watching.set()
        try:
            async for event in api.watch(path, {"resourceVersion": listed["metadata"]["resourceVersion"]}):
                name = (event.get("object") or {}).get("metadata", {}).get("name")
                if event["type"] == "ADDED" and name in wanted:
                    seen.setdefault(wanted[name], time.monotonic())
        except Exception:  # noqa: BLE001 - a watch that ends is listed and watched again
            await asyncio.sleep(0.2)


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def render(rows: list[dict]) -> str:
    lines = ["## Operator on the real control plane (bench/operator_real.py)", "",
             "Real `kompressor operator` process against kube-apiserver + etcd + controller-manager + scheduler "
             "(e2e/cluster, Kubernetes 1.37 Go modules, one process on 127.0.0.1), on this 2-core shared machine. "
             "Latency: create call returned → the pruning Job delivered by a watch (both measured by the client).",
             "", "| CRs created at once | CR → pruning Job p50 | p95 | max | all Jobs created after | operator RSS "
             "| operator CPU |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['p50'] * 1000:.0f} ms | {r['p95'] * 1000:.0f} ms | {r['max'] * 1000:.0f} ms | "
                     f"{r['all_jobs_s']:.1f} s | {r['rss_mb']:.0f} MB | {r['operator_cpu_s']:.1f} s |")
    by_n = {r["n"]: r for r in rows}
    verdicts = []
    if 200 in by_n:
        verdicts.append(f"p95 at 200 CRs {by_n[200]['p95']:.2f} s: {'met' if by_n[200]['p95'] <= 1 else 'NOT met'}")
    if 1000 in by_n:
        verdicts.append(f"RSS at 1000 CRs {by_n[1000]['rss_mb']:.0f} MB: "
                        f"{'met' if by_n[1000]['rss_mb'] <= 150 else 'NOT met'}")
    lines += ["", "Targets: p95 ≤ 1 s at 200 CRs; RSS ≤ 150 MB at 1000 CRs. Measured here: " + "; ".join(verdicts) + "."]
    return "\n".join(lines) + "\n"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--out", help="write the Markdown table here too")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args()
    reason = local.unavailable_reason()
    if reason:
        sys.exit(reason)
    tmp = Path(tempfile.mkdtemp(prefix="bench-operator-real-"))
    rows = []
    try:
        for n in args.sizes:
            (tmp / f"n{n}").mkdir()
            row = await measure(n, tmp / f"n{n}")
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        if args.keep:
            print(f"work folder kept: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    text = render(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    asyncio.run(main())
