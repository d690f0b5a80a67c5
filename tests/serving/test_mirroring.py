"""The online stage's mirrored runs (kompressor_jobs.serve.mirroring.mirror), on real ONNX Runtime sessions of a model
with token inputs it was not written for (a bag-of-tokens embedder: int64 ids, a dynamic token axis): copies whose
inputs agree merge into one run per model and batch of at most SERVING_MIRROR_BATCH_ROWS rows, with the outputs,
agreement and failures each copy would have had alone; copies of other shapes, and a copy the model rejects, do
not take the others down with them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kompressor.api import defaults as d
from kompressor.store import MODEL_FILE, write_manifest
from kompressor_jobs.serve.mirroring import MirrorCopy, agreement, mirror
from kompressor_jobs.serve.model import LoadedModel

VOCAB, DIM = 50, 8


def embedder(folder: Path, revision: int, seed: int) -> LoadedModel:
    """mean of the token embeddings, projected; Gather fails on an id outside the vocabulary."""
    rng = np.random.default_rng(seed)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"])
    out = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", DIM])
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["emb"], axis=0),
             helper.make_node("ReduceMean", ["emb"], ["pooled"], axes=[1], keepdims=0),
             helper.make_node("MatMul", ["pooled", "proj"], ["embedding"])]
    inits = [numpy_helper.from_array(rng.normal(size=(VOCAB, DIM)).astype(np.float32), "table"),
             numpy_helper.from_array(rng.normal(size=(DIM, DIM)).astype(np.float32), "proj")]
    model = helper.make_model(helper.make_graph(nodes, "embedder", [ids], [out], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / MODEL_FILE))
    write_manifest(folder, {"revision": revision})
    return LoadedModel(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mirroring")
    return embedder(root / "serving", 1, seed=1), embedder(root / "candidate", 2, seed=2)


def copies_of(serving: LoadedModel, candidate: LoadedModel, batches: list[np.ndarray]) -> list[MirrorCopy]:
    """Shadow copies: answered by the serving model (its real answers), to run on the candidate."""
    out = []
    for i, ids in enumerate(batches):
        first = serving.run({"input_ids": ids}, serving.output_names[:1])[0]
        out.append(MirrorCopy(candidate, serving, {"input_ids": ids}, len(ids), first, 0.001, f"r{i}", i))
    return out


def lone_truth(serving, candidate, ids: np.ndarray) -> tuple[np.ndarray, float]:
    theirs = serving.run({"input_ids": ids})[0]
    mine = candidate.run({"input_ids": ids})[0]
    return mine, agreement("embedding", mine, theirs)[1]


def test_copies_that_agree_merge_into_batches_with_each_copys_own_answer(models):
    serving, candidate = models
    rng = np.random.default_rng(0)
    rows = [int(r) for r in rng.integers(1, 9, size=40)]  # 40 copies, ~180 rows: several batches
    batches = [rng.integers(0, VOCAB, size=(r, 5)) for r in rows]
    runs = mirror("embedding", True, copies_of(serving, candidate, batches))

    assert len(runs) < len(batches)  # merged
    assert all(sum(c.rows for c in run.copies) <= d.SERVING_MIRROR_BATCH_ROWS for run in runs)
    assert [c.request_id for run in runs for c in run.copies] == [f"r{i}" for i in range(len(batches))]
    outputs = [o for run in runs for o in run.other_outputs]
    agreed = 0.0
    for ids, got in zip(batches, outputs):
        mine, agree = lone_truth(serving, candidate, ids)
        np.testing.assert_allclose(got, mine, rtol=1e-5, atol=1e-6)
        agreed += agree
    assert sum(run.rows for run in runs) == sum(rows)
    assert sum(run.agreement for run in runs) == pytest.approx(agreed, rel=1e-5)
    assert all(run.other_seconds > 0 and run.answered_seconds > 0 and not run.failures for run in runs)


def test_other_shapes_run_apart_and_a_rejected_copy_fails_alone(models):
    serving, candidate = models
    rng = np.random.default_rng(1)
    good = [rng.integers(0, VOCAB, size=(2, 5)) for _ in range(4)]
    longer = rng.integers(0, VOCAB, size=(2, 7))  # another token count: cannot join the others
    copies = copies_of(serving, candidate, [*good, longer])
    bad_ids = good[0].copy()
    bad_ids[0, 0] = VOCAB + 3  # the candidate's Gather rejects it; the serving answer is set by hand
    copies.append(MirrorCopy(candidate, serving, {"input_ids": bad_ids}, 2, copies[0].first, 0.001, "bad", 9))
    runs = mirror("embedding", True, copies)

    failed = [run for run in runs if run.other_failed]
    assert len(failed) == 1 and failed[0].copies == [] and failed[0].failures[0][1] is candidate
    compared = [c.request_id for run in runs for c in run.copies]
    assert sorted(compared) == sorted(f"r{i}" for i in range(5))  # every good copy compared, alone or merged
    assert sum(run.rows for run in runs) == 10
    expected = sum(lone_truth(serving, candidate, ids)[1] for ids in [*good, longer])
    assert sum(run.agreement for run in runs) == pytest.approx(expected, rel=1e-5)


def test_canary_copies_compare_the_candidates_answer_with_the_serving_model(models):
    serving, candidate = models
    ids = np.random.default_rng(2).integers(0, VOCAB, size=(3, 4))
    first = candidate.run({"input_ids": ids}, candidate.output_names[:1])[0]
    copy = MirrorCopy(serving, candidate, {"input_ids": ids}, 3, first, 0.002, "c", 1)
    [run] = mirror("embedding", False, [copy])  # a lone copy: the serving model runs, against the answer
    theirs = serving.run({"input_ids": ids})[0]
    np.testing.assert_allclose(run.other_outputs[0], theirs, rtol=1e-5, atol=1e-6)
    assert (run.rows, run.answered_seconds) == (3, 0.002)
    assert run.agreement == pytest.approx(agreement("embedding", first, theirs)[1], rel=1e-6)
