"""Ground-truth feedback through a real `kompressor serve --feedback-token-file`: labels matched by the client's id
or a server-assigned one move `kompressor_online_accuracy` to the share of right predictions over the window, per
revision; every refusal (malformed, unknown id, duplicate, out of range, no token) gets its 4xx, is counted, and
leaves the window alone; a list is judged label by label; without --feedback the endpoint does not exist, and
--feedback with several workers is refused."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest

from serving_support import N_CLASSES, N_FEATURES, Server, http, infer_body, metric_value

TOKEN = "s3cret-token"
WINDOW = 4
MAX_REQUESTS = 16


@pytest.fixture(scope="module")
def labelled(artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("feedback")
    (root / "token").write_text(TOKEN + "\n")
    srv = Server(artifacts[1], "mlp", log=root / "server.log",
                 extra=["--feedback-token-file", str(root / "token"), "--feedback-window", str(WINDOW),
                        "--feedback-max-requests", str(MAX_REQUESTS)])
    yield srv
    srv.stop()


def post(url: str, body=None, raw: bytes | None = None, token: str | None = TOKEN) -> tuple[int, object]:
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def feedback_url(server: Server) -> str:
    return f"{server.url}/v2/models/{server.name}/feedback"


def predict(server: Server, request_id: str | None = None, rows: int = 1) -> tuple[str, list[int]]:
    """(the id of the answer, the class predicted for each row: argmax of the logits the server returned)."""
    x = np.random.default_rng().normal(size=(rows, N_FEATURES)).astype(np.float32)
    status, out = http("POST", server.infer_url(), infer_body(x, request_id=request_id))
    assert status == 200, out
    logits = np.array(out["outputs"][0]["data"]).reshape(rows, N_CLASSES)
    return out["id"], logits.argmax(axis=1).tolist()


def accuracy(server: Server, revision: str = "1") -> float:
    return metric_value(server.metrics(), "kompressor_online_accuracy", model="mlp", revision=revision)


def refused(server: Server, reason: str) -> float:
    return metric_value(server.metrics(), "kompressor_feedback_labels_refused_total", model="mlp", reason=reason)


def wrong(label: int) -> int:
    return (label + 1) % N_CLASSES


def fresh_window(server: Server, right: int) -> list[bool]:
    """Fill the window with WINDOW labelled predictions, ``right`` of them right; their outcomes, in order."""
    outcomes = [i < right for i in range(WINDOW)]
    for correct in outcomes:
        request_id, (predicted,) = predict(server, f"fill-{uuid.uuid4().hex}")
        label = predicted if correct else wrong(predicted)
        status, out = post(feedback_url(server), {"id": request_id, "label": label})
        assert status == 200 and out["status"] == "accepted", out
    return outcomes


def test_metadata_lists_the_extension_and_ids_are_assigned_when_absent(labelled):
    assert "feedback" in http("GET", f"{labelled.url}/v2")[1]["extensions"]
    first, (predicted,) = predict(labelled)
    second, _ = predict(labelled)
    assert first and second and first != second  # assigned, returned, unique
    status, out = post(feedback_url(labelled), {"id": first, "label": predicted})
    assert (status, out) == (200, {"id": first, "status": "accepted"})
    assert predict(labelled, "mine")[0] == "mine"  # a client's id is kept as it is


def test_accuracy_is_the_share_of_right_labels_over_the_sliding_window(labelled):
    fresh_window(labelled, right=WINDOW)
    assert accuracy(labelled) == 1.0
    fresh_window(labelled, right=1)  # the window holds the last WINDOW labels only
    assert accuracy(labelled) == pytest.approx(1 / WINDOW)
    assert metric_value(labelled.metrics(), "kompressor_online_accuracy_labels", model="mlp", revision="1") == WINDOW
    before = metric_value(labelled.metrics(), "kompressor_feedback_labels_accepted_total", model="mlp", revision="1")
    fresh_window(labelled, right=3)
    assert accuracy(labelled) == pytest.approx(3 / WINDOW)
    after = metric_value(labelled.metrics(), "kompressor_feedback_labels_accepted_total", model="mlp", revision="1")
    assert after - before == WINDOW


def test_a_request_of_several_rows_takes_one_label_per_row(labelled):
    fresh_window(labelled, right=0)
    request_id, predicted = predict(labelled, f"rows-{uuid.uuid4().hex}", rows=WINDOW)
    status, out = post(feedback_url(labelled), {"id": request_id, "label": predicted[0]})
    assert status == 422 and out["reason"] == "label_out_of_range", out  # one label for four rows
    labels = [p if i % 2 else wrong(p) for i, p in enumerate(predicted)]
    assert post(feedback_url(labelled), {"id": request_id, "label": labels})[0] == 200
    assert accuracy(labelled) == pytest.approx(0.5)


@pytest.mark.parametrize("reason,status,body", [
    ("malformed", 400, b"{not json"),
    ("malformed", 400, b'"just a string"'),
    ("malformed", 400, b"[]"),
    ("malformed", 400, b'{"label": 1}'),
    ("malformed", 400, b'{"id": 7, "label": 1}'),
    ("malformed", 400, b'{"id": "known"}'),
    ("unknown_id", 404, b'{"id": "never-served", "label": 0}'),
    ("label_out_of_range", 422, b'{"id": "known", "label": 3}'),
    ("label_out_of_range", 422, b'{"id": "known", "label": -1}'),
    ("label_out_of_range", 422, b'{"id": "known", "label": true}'),
    ("label_out_of_range", 422, b'{"id": "known", "label": 1.0}'),
    ("label_out_of_range", 422, b'{"id": "known", "label": "1"}'),
    ("label_out_of_range", 422, b'{"id": "known", "label": [0, 1]}'),
])
def test_a_bad_label_is_refused_counted_and_leaves_the_window_alone(labelled, reason, status, body):
    fresh_window(labelled, right=2)
    known, _ = predict(labelled, f"known-{uuid.uuid4().hex}")
    counted = refused(labelled, reason)
    got, out = post(feedback_url(labelled), raw=body.replace(b'"known"', json.dumps(known).encode()))
    assert got == status and out["error"], out
    assert refused(labelled, reason) == counted + 1
    assert accuracy(labelled) == pytest.approx(2 / WINDOW)


def test_a_second_label_for_an_id_is_refused_as_duplicate(labelled):
    fresh_window(labelled, right=WINDOW)
    request_id, (predicted,) = predict(labelled, f"dup-{uuid.uuid4().hex}")
    assert post(feedback_url(labelled), {"id": request_id, "label": predicted})[0] == 200
    counted = refused(labelled, "duplicate")
    status, out = post(feedback_url(labelled), {"id": request_id, "label": wrong(predicted)})
    assert status == 409 and out["reason"] == "duplicate", out
    assert refused(labelled, "duplicate") == counted + 1
    assert accuracy(labelled) == 1.0


def test_the_oldest_requests_are_forgotten_beyond_the_bound(labelled):
    oldest, (predicted,) = predict(labelled, f"old-{uuid.uuid4().hex}")
    for _ in range(MAX_REQUESTS):
        predict(labelled)
    status, out = post(feedback_url(labelled), {"id": oldest, "label": predicted})
    assert status == 404 and out["reason"] == "unknown_id", out


def test_a_list_is_judged_label_by_label(labelled):
    fresh_window(labelled, right=0)
    good = [predict(labelled, f"list-{uuid.uuid4().hex}") for _ in range(2)]
    counted = refused(labelled, "unknown_id")
    body = [{"id": good[0][0], "label": good[0][1][0]}, {"id": "never-served", "label": 0},
            {"id": good[1][0], "label": good[1][1][0]}, "not a label", {"id": good[0][0], "label": good[0][1][0]}]
    status, out = post(feedback_url(labelled), body)
    assert status == 200 and (out["accepted"], out["refused"]) == (2, 3), out
    assert [r["status"] for r in out["results"]] == ["accepted", "refused", "accepted", "refused", "refused"]
    assert [r.get("reason") for r in out["results"]] == [None, "unknown_id", None, "malformed", "duplicate"]
    assert refused(labelled, "unknown_id") == counted + 1
    assert accuracy(labelled) == pytest.approx(2 / WINDOW)
    status, out = post(feedback_url(labelled), [{"id": "never-served", "label": 0}] * 2)
    assert status == 404 and out["accepted"] == 0, out  # none accepted: the status they share


@pytest.mark.parametrize("token", [None, "wrong-token", ""])
def test_a_missing_or_wrong_token_gets_401_and_is_counted(labelled, token):
    fresh_window(labelled, right=WINDOW)
    request_id, (predicted,) = predict(labelled, f"tok-{uuid.uuid4().hex}")
    counted = refused(labelled, "unauthorized")
    status, out = post(feedback_url(labelled), {"id": request_id, "label": wrong(predicted)}, token=token)
    assert status == 401 and out["error"], out
    assert refused(labelled, "unauthorized") == counted + 1
    assert accuracy(labelled) == 1.0
    assert post(feedback_url(labelled), {"id": request_id, "label": wrong(predicted)})[0] == 200  # still labellable


def test_accuracy_is_kept_per_revision(labelled, artifacts):
    fresh_window(labelled, right=WINDOW)
    status, out = http("POST", f"{labelled.url}/v2/repository/models/mlp/load",
                       {"parameters": {"artifact": str(artifacts[2])}})
    assert status == 200 and out["version"] == "2", out
    fresh_window(labelled, right=1)
    assert accuracy(labelled, "2") == pytest.approx(1 / WINDOW)
    assert accuracy(labelled, "1") == 1.0


def test_without_feedback_there_is_no_endpoint_and_no_assigned_id(server):
    assert "feedback" not in http("GET", f"{server.url}/v2")[1]["extensions"]
    status, out = http("POST", server.infer_url(), infer_body(np.zeros((1, N_FEATURES))))
    assert status == 200 and "id" not in out
    assert http("POST", feedback_url(server), {"id": "x", "label": 0})[0] == 404
    assert http("GET", f"{feedback_url(server)}/windows")[0] == 404


def test_feedback_with_several_workers_is_refused(artifacts):
    result = subprocess.run([sys.executable, "-m", "kompressor.cli", "serve", "--artifact", str(artifacts[1]),
                             "--name", "mlp", "--port", "0", "--workers", "2", "--feedback"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--feedback needs one server process" in result.stderr


@pytest.mark.parametrize("flags,message", [
    (["--feedback", "--feedback-window", "0"], "must be positive"),
    (["--feedback", "--feedback-max-requests", "0"], "must be positive"),
    (["--feedback-token-file", "EMPTY"], "the file is empty"),
    (["--feedback-token-file", "MISSING"], "cannot read it"),
])
def test_bad_feedback_settings_are_refused_at_start(artifacts, tmp_path, flags, message):
    (tmp_path / "EMPTY").write_text("\n")
    flags = [str(tmp_path / f) if f in ("EMPTY", "MISSING") else f for f in flags]
    result = subprocess.run([sys.executable, "-m", "kompressor.cli", "serve", "--artifact", str(artifacts[1]),
                             "--name", "mlp", "--port", "0", *flags], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_a_grpc_request_can_be_labelled_over_rest_by_its_id_or_the_one_assigned(artifacts, tmp_path):
    import tritonclient.grpc as tg

    srv = Server(artifacts[1], "mlp", log=tmp_path / "server.log", grpc=True, extra=["--feedback"])
    client = tg.InferenceServerClient(srv.grpc_target)
    try:
        x = np.random.default_rng(3).normal(size=(1, N_FEATURES)).astype(np.float32)
        tensor = tg.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("mlp", [tensor], request_id="over-grpc")
        predicted = int(result.as_numpy("logits").argmax())
        assert result.get_response().id == "over-grpc"
        assert post(feedback_url(srv), {"id": "over-grpc", "label": wrong(predicted)}, token=None)[0] == 200
        assert accuracy(srv) == 0.0
        anonymous = client.infer("mlp", [tensor])  # no id: the server assigns one and returns it, as over REST
        assigned = anonymous.get_response().id
        assert len(assigned) == 32
        assert post(feedback_url(srv), {"id": assigned, "label": predicted}, token=None)[0] == 200
        assert accuracy(srv) == 0.5
    finally:
        client.close()
        srv.stop()
