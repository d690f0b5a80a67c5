"""The online stage through a real `kompressor serve --candidate ...`: shadow answers from the serving revision only
and measures the candidate (agreement 1 for an identical one, well below for another); a full mirror queue drops
and counts; canary answers exactly its share from the candidate (REST and gRPC), a weight change keeps the counts,
another candidate starts them over, DELETE and a promotion end it; labels count for either revision, refused ones
for nothing; a bad candidate is refused (400, state kept; at start: served without it and reported), and so are bad
settings and several workers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from kompressor.store import write_manifest
from serving_support import N_CLASSES, N_FEATURES, Server, http, infer_body, load_body, metric_value, ort_run
from support.polling import wait

pytestmark = pytest.mark.slow

ROWS = 4


@pytest.fixture(scope="module")
def more(artifacts, tmp_path_factory):
    """Revision 3: revision 1's very model (identical answers); revision 4: a slow one (for a full queue)."""
    import torch

    root = tmp_path_factory.mktemp("online")
    same = root / "r3"
    same.mkdir()
    shutil.copy(artifacts[1] / "model.onnx", same / "model.onnx")
    write_manifest(same, {"revision": 3})
    slow = root / "r4"
    slow.mkdir()
    torch.manual_seed(4)
    wide = torch.nn.Sequential(torch.nn.Linear(N_FEATURES, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                               torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                               torch.nn.Linear(1024, N_CLASSES)).eval()
    with warnings.catch_warnings():  # the legacy exporter announces its own deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(wide, torch.zeros(2, N_FEATURES), slow / "model.onnx", dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    write_manifest(slow, {"revision": 4})
    return {"same": same, "slow": slow, "root": root}


@pytest.fixture(scope="module")
def srv(artifacts, more):
    server = Server(artifacts[1], "mlp", log=more["root"] / "server.log", grpc=True,
                    extra=["--feedback", "--candidate", f"file://{artifacts[2]}", "--candidate-mode", "canary",
                           "--candidate-weight", "30"])
    yield server
    server.stop()


def online(server: Server) -> dict:
    status, out = http("GET", f"{server.url}/v2/models/{server.name}/online")
    assert status == 200, out
    return out


def candidate_url(server: Server) -> str:
    return f"{server.url}/v2/repository/models/{server.name}/candidate"


def set_candidate(server: Server, artifact, mode: str, weight: float = 0, sha256="manifest") -> tuple[int, dict]:
    body = load_body(artifact, sha256)
    body["parameters"].update(mode=mode, weight=weight)
    return http("POST", candidate_url(server), body)


def fresh(server: Server, artifact, mode: str, weight: float = 0) -> dict:
    assert http("DELETE", candidate_url(server)) == (200, {"candidate": None})
    status, out = set_candidate(server, artifact, mode, weight)
    assert status == 200 and out["candidate"]["requests"] == 0, out
    return out["candidate"]


def send(server: Server, x: np.ndarray, request_id: str | None = None) -> tuple[str, np.ndarray, str | None]:
    """(model_version, first output, id) of one REST answer."""
    status, out = http("POST", server.infer_url(), infer_body(x, request_id=request_id))
    assert status == 200, out
    return out["model_version"], np.array(out["outputs"][0]["data"]).reshape(x.shape[0], N_CLASSES), out.get("id")


def settled(server: Server, **counts) -> dict:
    """The candidate's evidence once its counts reach ``counts`` (the mirrored work is done)."""
    return wait(lambda: (c := online(server)["candidate"]) and all(c[k] == v for k, v in counts.items()) and c,
                30, f"candidate counts {counts}", lambda: json.dumps(online(server)))


def test_the_start_up_candidate_and_the_extension(srv):
    assert "online_stage" in http("GET", f"{srv.url}/v2")[1]["extensions"]
    out = online(srv)
    assert len(out["instance"]) == 32 and out["serving"] == {"revision": 1}
    c = out["candidate"]
    assert (c["revision"], c["mode"], c["weight"]) == (2, "canary", 30.0) and c["since"].endswith("Z")
    assert c["latency_buckets"][-1] is None and len(c["candidate_latency"]) == len(c["latency_buckets"])
    assert online(srv)["instance"] == out["instance"]


@pytest.mark.parametrize("which", ["same", "other"])
def test_shadow_answers_from_serving_and_measures_the_candidate(srv, artifacts, more, which):
    cand = more["same"] if which == "same" else artifacts[2]
    fresh(srv, cand, "shadow")
    xs = np.random.default_rng(5).normal(size=(20, ROWS, N_FEATURES)).astype(np.float32)
    for x in xs:
        version, y, _ = send(srv, x)
        assert version == "1"
        np.testing.assert_allclose(y, ort_run(artifacts[1], x), rtol=1e-5, atol=1e-6)
    c = settled(srv, requests=len(xs), compared=len(xs) * ROWS)
    assert (c["errors"], c["dropped"]) == (0, 0)
    runs = sum(c["candidate_latency"])  # one observation per mirrored run: merged copies share one
    assert runs == sum(c["serving_latency"]) and 1 <= runs <= len(xs)
    assert metric_value(srv.metrics(), "kompressor_online_run_seconds_count", revision=str(c["revision"]),
                        role="candidate") >= runs
    agree = sum(int((ort_run(cand, x).argmax(1) == ort_run(artifacts[1], x).argmax(1)).sum()) for x in xs)
    assert c["agreement"] == pytest.approx(agree)
    if which == "same":
        assert c["agreement"] == len(xs) * ROWS
    else:
        assert c["agreement"] / c["compared"] < 0.8
    metrics = srv.metrics()
    assert metric_value(metrics, "kompressor_online_agreement_rows_total", revision=str(c["revision"])) >= c["compared"]


def test_a_full_mirror_queue_drops_and_counts(artifacts, more):
    server = Server(artifacts[1], "mlp", log=more["root"] / "slow.log",
                    extra=["--candidate", str(more["slow"]), "--mirror-queue", "1"])
    try:
        x = np.random.default_rng(6).normal(size=(256, N_FEATURES)).astype(np.float32)
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: send(server, x)[0], range(64)))
        assert answers == ["1"] * 64  # nobody waited for the candidate, nobody was refused
        c = wait(lambda: (c := online(server)["candidate"])["requests"] + c["dropped"] == 64 and c, 60,
                 "every copy mirrored or dropped", lambda: json.dumps(online(server)))
        assert c["dropped"] > 0 and c["requests"] >= 1
        assert metric_value(server.metrics(), "kompressor_online_mirror_dropped_total", model="mlp") == c["dropped"]
    finally:
        server.stop()


def test_canary_answers_exactly_its_share(srv, artifacts, more):
    import tritonclient.grpc as tg

    fresh(srv, artifacts[2], "canary", 30)
    xs = np.random.default_rng(7).normal(size=(100, 1, N_FEATURES)).astype(np.float32)
    versions = []
    for x in xs:
        version, y, _ = send(srv, x)
        versions.append(version)
        np.testing.assert_allclose(y, ort_run(artifacts[int(version)], x), rtol=1e-5, atol=1e-6)
    assert versions.count("2") == 30 and set(versions) == {"1", "2"}
    c = settled(srv, requests=30, compared=30)
    assert 1 <= sum(c["serving_latency"]) == sum(c["candidate_latency"]) <= 30
    client = tg.InferenceServerClient(srv.grpc_target)  # gRPC goes through the same splitter
    grpc_versions = []
    try:
        for x in xs[:10]:
            tensor = tg.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            answer = client.infer("mlp", [tensor])
            version = answer.get_response().model_version
            grpc_versions.append(version)
            np.testing.assert_allclose(answer.as_numpy("logits"), ort_run(artifacts[int(version)], x), rtol=1e-5,
                                       atol=1e-6)  # the answer is the model its version names
    finally:
        client.close()
    assert grpc_versions.count("2") == 3
    assert settled(srv, requests=33, compared=33)["errors"] == 0
    metrics = srv.metrics()
    assert metric_value(metrics, "kompressor_online_candidate_requests_total", revision="2", mode="canary") >= 33

    status, out = set_candidate(srv, artifacts[2], "canary", 50)  # only the weight: counts kept
    assert status == 200 and (out["candidate"]["weight"], out["candidate"]["requests"]) == (50.0, 33), out
    assert out["candidate"]["since"] == c["since"]
    status, out = set_candidate(srv, artifacts[2], "canary", 50, sha256=None)  # loaded again: the same artifact
    assert status == 200 and out["candidate"]["requests"] == 33, out
    assert metric_value(srv.metrics(), "kompressor_online_candidate_weight", model="mlp") == 50
    assert [send(srv, x)[0] for x in xs[:10]].count("2") == 5
    assert online(srv)["candidate"]["requests"] == 38

    for artifact, mode in ((artifacts[2], "shadow"), (more["same"], "canary")):  # another: counts start over
        status, out = set_candidate(srv, artifact, mode, 50)
        assert status == 200 and out["candidate"]["requests"] == 0 and out["candidate"]["mode"] == mode, out

    assert http("DELETE", candidate_url(srv)) == (200, {"candidate": None})
    assert {send(srv, x)[0] for x in xs[:20]} == {"1"}
    assert online(srv)["candidate"] is None


def label(server: Server, request_id: str, value) -> int:
    return http("POST", f"{server.url}/v2/models/{server.name}/feedback", {"id": request_id, "label": value})[0]


def test_labels_count_for_the_candidate_in_both_modes(srv, artifacts):
    xs = np.random.default_rng(8).normal(size=(12, 1, N_FEATURES)).astype(np.float32)
    assert http("DELETE", candidate_url(srv))[0] == 200
    _, before, _ = send(srv, xs[0], "before-the-stint")
    fresh(srv, artifacts[2], "shadow")
    served = [send(srv, x, f"shadow-{i}") for i, x in enumerate(xs)]
    settled(srv, requests=len(xs))
    labels = [i % N_CLASSES for i in range(len(xs))]
    for i, (_, y, request_id) in enumerate(served):
        assert label(srv, request_id, labels[i]) == 200
    assert label(srv, "before-the-stint", int(before.argmax())) == 200  # served before the candidate was set
    for refused in (("shadow-0", 0), ("never-served", 0), ("shadow-1", N_CLASSES)):  # duplicate, unknown, range
        assert label(srv, *refused) in (404, 409, 422)
    c = online(srv)["candidate"]
    candidate_classes = [int(ort_run(artifacts[2], x).argmax()) for x in xs]
    assert (c["serving_labels"], c["labels"]) == (len(xs), len(xs))
    assert c["serving_right"] == sum(int(y.argmax()) == t for (_, y, _), t in zip(served, labels))
    assert c["right"] == sum(p == t for p, t in zip(candidate_classes, labels))

    fresh(srv, artifacts[2], "canary", 50)
    answered = [send(srv, x, f"canary-{i}") for i, x in enumerate(xs)]
    for _, y, request_id in answered:
        assert label(srv, request_id, 0) == 200
    assert label(srv, "canary-0", 1) == 409
    c = online(srv)["candidate"]
    mine = [int(y.argmax()) for version, y, _ in answered if version == "2"]
    theirs = [int(y.argmax()) for version, y, _ in answered if version == "1"]
    assert (c["labels"], c["serving_labels"]) == (len(mine), len(theirs)) == (6, 6)
    assert (c["right"], c["serving_right"]) == (mine.count(0), theirs.count(0))


@pytest.mark.parametrize("change", ["missing", "sha256", "mode", "weight", "bool-weight", "relative", "serving"])
def test_a_bad_candidate_is_refused_and_the_old_one_kept(srv, artifacts, more, change):
    kept = fresh(srv, more["same"], "canary", 20)
    body = load_body(artifacts[2])
    body["parameters"].update(mode="canary", weight=10)
    p = body["parameters"]
    if change == "missing":
        p["artifact"] = str(more["root"] / "nowhere")
    elif change == "sha256":
        p["sha256"] = "0" * 64
    elif change == "mode":
        p["mode"] = "blue-green"
    elif change == "weight":
        p["weight"] = 150
    elif change == "bool-weight":
        p["weight"] = True
    elif change == "relative":
        p["artifact"] = "r2"
    else:
        body = load_body(artifacts[1])
        body["parameters"].update(mode="shadow")
    status, out = http("POST", candidate_url(srv), body)
    assert status == 400 and out["error"], out
    assert online(srv)["candidate"] == kept


def test_a_promotion_ends_the_stage(srv, artifacts):
    fresh(srv, artifacts[2], "canary", 10)
    load = f"{srv.url}/v2/repository/models/mlp/load"
    assert http("POST", load, load_body(artifacts[2]))[0] == 200
    out = online(srv)
    assert (out["serving"], out["candidate"]) == ({"revision": 2}, None)
    assert http("POST", load, load_body(artifacts[1]))[0] == 200


@pytest.mark.parametrize("flags,message", [
    (["--candidate", "R2", "--candidate-mode", "canary", "--candidate-weight", "150"], "weight must be"),
    (["--candidate", "R2", "--workers", "2"], "--candidate needs --workers 1"),
])
def test_bad_candidate_settings_at_start_are_refused(artifacts, tmp_path, flags, message):
    names = {"R2": str(artifacts[2])}
    result = subprocess.run([sys.executable, "-m", "kompressor.cli", "serve", "--artifact", str(artifacts[1]),
                             "--name", "mlp", "--port", "0", *[names.get(f, f) for f in flags]],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "--candidate" in result.stderr


@pytest.mark.parametrize("flags,message", [
    (["--candidate", "MISSING"], "no manifest.json"),
    (["--candidate", "R2", "--candidate-sha256", "0" * 64], "is not the expected"),
    (["--candidate", "R1"], "must be another revision"),
])
def test_a_candidate_that_cannot_be_loaded_at_start_is_reported_and_serving_goes_on(artifacts, tmp_path, flags,
                                                                                    message):
    """In a cluster the candidate is in the serving Pod's arguments: a bad one must not take serving down."""
    names = {"MISSING": str(tmp_path / "missing"), "R1": str(artifacts[1]), "R2": str(artifacts[2])}
    server = Server(artifacts[1], "mlp", extra=[names.get(f, f) for f in flags])
    try:
        x = np.random.default_rng(0).normal(size=(1, N_FEATURES)).astype(np.float32)
        status, answer = http("POST", server.infer_url(), infer_body(x))
        assert status == 200 and answer["model_version"] == "1"
        _, evidence = http("GET", f"{server.url}/v2/models/mlp/online")
        assert evidence["candidate"] is None
        assert message in evidence["candidate_error"]["error"] and "--candidate" in evidence["candidate_error"]["error"]
    finally:
        server.stop()


@pytest.mark.parametrize("task,candidate,serving,expected", [
    ("classification", [[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], [[0.2, 0.8], [0.1, 0.9], [0.4, 0.6]], (3, 2.0)),
    ("embedding", [[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], [[2.0, 0.0], [1.0, 0.0], [0.0, 0.0]], (3, 1.0 + 0.0 + 1.0)),
    ("regression", [11.0, 0.0, -5.0], [10.0, 0.0, 5.0], (3, 0.9 + 1.0 + 0.0)),
    ("regression", [[1.0, 3.0]], [[2.0, 3.0]], (1, 0.75)),
    ("classification", [[0.1, 0.9]], [[0.1, 0.9, 0.0]], (1, 0.0)),  # shapes differ: no agreement
])
def test_agreement_per_task(task, candidate, serving, expected):
    from kompressor_jobs.serve.mirroring import agreement

    rows, total = agreement(task, np.array(candidate, np.float32), np.array(serving, np.float32))
    assert (rows, total) == (expected[0], pytest.approx(expected[1]))
