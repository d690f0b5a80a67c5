"""Compression, evaluation, gating, approval and promotion transitions of the reconcile core."""

from dataclasses import replace

import pytest
from reconcile_world import (NAME, NAMESPACE, World, condition, events, make_report, names_of, of_type)

from kompressor.api import defaults as d
from kompressor.core import names, reasons
from kompressor.core.actions import DeleteJob, EmitEvent, Requeue, RunJob, Serve


def test_a_new_resource_starts_compressing_revision_1():
    world = World.new()
    decision = world.step()
    st = decision.status
    assert (st.phase, st.candidate.revision, st.candidate.reason, st.candidate.stage) == \
        ("Compressing", 1, "initial", "prune")
    assert of_type(decision, RunJob) == [RunJob(
        kind="prune", name=names.job_name(NAME, "prune", 1, 1), revision=1, generation=1,
        candidate_key=names.candidate_key(NAMESPACE, NAME, 1), eval_key=names.eval_key(NAMESPACE, NAME, 1))]
    assert events(decision) == [reasons.COMPRESSION_STARTED]
    assert st.compression_digest and st.observed_generation == 1
    assert (condition(st, "Compressed").status, condition(st, "Compressed").reason) == ("False", reasons.COMPRESSING)


def test_a_running_prune_job_changes_nothing():
    world = World.new()
    world.step()
    decision = world.step()
    assert decision.status == world.decisions[0].status
    assert decision.actions == ()


def test_prune_succeeded_starts_the_evaluation():
    world = World.new()
    world.step()
    world.finish("prune")
    decision = world.step()
    assert decision.status.phase == "Evaluating" and decision.status.candidate.stage == "evaluate"
    assert [(a.kind, a.name) for a in of_type(decision, RunJob)] == [("evaluate", names_of(world, "evaluate", 1, 1))]
    assert events(decision) == [reasons.EVALUATION_STARTED]


@pytest.mark.parametrize("kind", ["prune", "evaluate"])
def test_a_job_that_exhausts_its_backoff_fails_the_resource(kind):
    world = World.new()
    world.step()
    if kind == "evaluate":
        world.finish("prune")
        world.step()
    world.finish(kind, phase="Failed", message="BackoffLimitExceeded: OOMKilled")
    decision = world.step()
    st = decision.status
    assert st.phase == "Failed"
    assert "OOMKilled" in st.message and kind in st.message and d.ANNOTATION_RETRY in st.message
    assert (condition(st, "Compressed").status, condition(st, "Compressed").reason) == ("False", reasons.JOB_FAILED)
    assert events(decision) == [reasons.JOB_FAILED]
    assert of_type(decision, RunJob) == []
    again = world.step()  # Failed is sticky: no new Job, no repeated event
    assert again.status.phase == "Failed" and again.actions == ()


@pytest.mark.parametrize("kind", ["prune", "evaluate"])
def test_a_job_failed_on_bad_input_says_so_and_what_to_do(kind):
    """Exit 2 is not retried (podFailurePolicy): the message says the input was bad, so a person fixes the
    spec and sets the retry annotation; the condition reason stays JobFailed (a failed candidate)."""
    world = World.new()
    world.step()
    if kind == "evaluate":
        world.finish("prune")
        world.step()
    job = world.job(kind, revision=1)
    world.jobs[job.name] = replace(job, phase="Failed", message="model file not found: /m/model.pt2",
                                   bad_input=True)
    decision = world.step()
    st = decision.status
    assert st.phase == "Failed"
    for text in (st.message, condition(st, "Compressed").message):
        assert "bad input" in text and "not retried" in text and "model file not found: /m/model.pt2" in text
        assert job.name in text and "after its retries" not in text
    assert "fix the spec" in st.message and d.ANNOTATION_RETRY in st.message
    assert condition(st, "Compressed").reason == reasons.JOB_FAILED
    [event] = [a for a in decision.actions if isinstance(a, EmitEvent)]
    assert (event.reason, event.type) == (reasons.JOB_FAILED, "Warning") and "bad input, not retried" in event.message
    assert of_type(decision, RunJob) == []

    # A new retry token starts a new candidate (the person fixed the input).
    world.annotate(d.ANNOTATION_RETRY, "fixed")
    again = world.step()
    assert again.status.phase == "Compressing" and again.status.candidate.revision == 2
    assert events(again) == [reasons.RETRY_REQUESTED, reasons.COMPRESSION_STARTED]


def test_a_missing_report_waits_and_requeues():
    world = World.new()
    world.step()
    world.finish("prune")
    world.step()
    world.finish("evaluate")
    world.reports.clear()
    decision = world.step()
    assert decision.status.phase == "Evaluating" and "report" in decision.status.message
    assert of_type(decision, Requeue) and of_type(decision, RunJob) == []


def test_passing_gates_record_the_revision_and_baseline_then_promote():
    world = World.new()
    world.step()
    world.finish("prune")
    world.step()
    report = make_report(1, accuracy=0.955, sparsity=0.5)
    world.finish("evaluate", report=report)
    decision = world.step()
    st = decision.status
    assert st.phase == "Promoting" and st.candidate is None
    assert [r.revision for r in st.revisions] == [0, 1]
    baseline, rev1 = st.revisions
    assert (baseline.artifact, baseline.metrics) == (report.baseline_artifact, report.baseline_metrics)
    assert (rev1.artifact, rev1.metrics, rev1.gates, rev1.reason, rev1.generation) == \
        (report.artifact, report.metrics, report.gates, "initial", 1)
    assert rev1.promoted_at == "2026-11-22T12:00:00Z"
    assert (st.current_revision, st.last_promoted_revision, st.sparsity, st.accuracy) == (1, 1, 0.5, 0.955)
    assert of_type(decision, Serve) == [Serve(revision=1, artifact=report.artifact,
                                              drift_reference="builtin://digits?split=eval")]
    assert events(decision) == [reasons.PROMOTING]
    assert condition(st, "GatesPassed").status == "True"
    assert condition(st, "Compressed").status == "True"
    assert (condition(st, "Promoted").status, condition(st, "Promoted").reason) == ("False", reasons.PROMOTING)


def test_promoting_becomes_serving_only_when_serving_is_ready_at_the_target():
    world = World.new()
    world.step()
    world.finish("prune")
    world.step()
    world.finish("evaluate")
    world.step()
    not_ready = world.step()
    assert not_ready.status.phase == "Promoting"
    assert condition(not_ready.status, "Ready").status == "False"
    world.ready()
    decision = world.step()
    st = decision.status
    assert st.phase == "Serving" and events(decision) == [reasons.PROMOTED]
    assert (condition(st, "Ready").status, condition(st, "Promoted").status) == ("True", "True")
    assert of_type(decision, Serve)[0].revision == 1  # Serve on every reconcile (adapters make it idempotent)


def test_failing_gates_reject_and_name_the_failing_gate():
    world = World.new()
    world.step()
    world.finish("prune")
    world.step()
    world.finish("evaluate", report=make_report(1, passed=False, accuracy=0.90))
    decision = world.step()
    st = decision.status
    assert st.phase == "Rejected" and "maxAccuracyDrop" in st.message
    gates = condition(st, "GatesPassed")
    assert (gates.status, gates.reason) == ("False", reasons.GATES_FAILED) and "maxAccuracyDrop" in gates.message
    assert events(decision) == [reasons.REJECTED]
    assert of_type(decision, Serve) == [] and st.current_revision is None
    assert [r.revision for r in st.revisions] == [0, 1]  # the rejected revision stays in the history
    assert (condition(st, "Ready").status, condition(st, "Ready").reason) == ("False", "Rejected")


class TestApproval:
    def _evaluated(self, annotations=None):
        world = World.new({"promotion": {"requireApproval": True}}, annotations=annotations)
        world.step()
        world.finish("prune")
        world.step()
        world.finish("evaluate")
        return world

    def test_waits_for_the_approve_annotation_naming_the_revision(self):
        world = self._evaluated()
        decision = world.step()
        assert decision.status.phase == "AwaitingApproval" and f"{d.ANNOTATION_APPROVE}=1" in decision.status.message
        assert events(decision) == [reasons.AWAITING_APPROVAL] and of_type(decision, Serve) == []
        assert condition(decision.status, "Promoted").reason == reasons.AWAITING_APPROVAL
        assert world.step().actions == ()  # nothing repeated while waiting
        world.annotate(d.ANNOTATION_APPROVE, "2")  # another revision: not an approval of revision 1
        assert world.step().status.phase == "AwaitingApproval"
        world.annotate(d.ANNOTATION_APPROVE, "1")
        approved = world.step()
        assert approved.status.phase == "Promoting" and approved.status.current_revision == 1
        assert events(approved) == [reasons.APPROVED, reasons.PROMOTING]
        assert of_type(approved, Serve)[0].revision == 1

    def test_an_approval_given_in_advance_promotes_at_once(self):
        world = self._evaluated(annotations={d.ANNOTATION_APPROVE: "1"})
        assert world.step().status.phase == "Promoting"

    def test_turning_approval_off_promotes_the_waiting_revision(self):
        world = self._evaluated()
        world.step()
        world.edit({"promotion": {"requireApproval": False}})
        decision = world.step()
        assert decision.status.phase == "Promoting" and decision.status.current_revision == 1
        assert of_type(decision, RunJob) == []  # not a compression input: nothing recompressed


class TestRetry:
    def _failed(self):
        world = World.new()
        world.step()
        world.finish("prune", phase="Failed", message="boom")
        world.step()
        assert world.status.phase == "Failed"
        return world

    def test_a_new_retry_token_after_failed_starts_a_new_revision(self):
        world = self._failed()
        world.annotate(d.ANNOTATION_RETRY, "try-2")
        decision = world.step()
        st = decision.status
        assert st.phase == "Compressing" and (st.candidate.revision, st.candidate.reason) == (2, "retry")
        assert st.handled_retry == "try-2"
        assert [a.name for a in of_type(decision, RunJob)] == [names_of(world, "prune", 2, 1)]
        assert events(decision) == [reasons.RETRY_REQUESTED, reasons.COMPRESSION_STARTED]
        assert world.step().status.candidate.revision == 2  # the same token is not acted on twice

    def test_a_retry_token_after_rejected_retries(self):
        world = World.new()
        world.step()
        world.finish("prune")
        world.step()
        world.finish("evaluate", report=make_report(1, passed=False, accuracy=0.9))
        world.step()
        world.annotate(d.ANNOTATION_RETRY, "1")
        decision = world.step()
        assert decision.status.candidate.revision == 2 and decision.status.candidate.reason == "retry"

    def test_a_retry_token_outside_failed_or_rejected_is_consumed_without_effect(self):
        world = World.new()
        world.step()
        world.annotate(d.ANNOTATION_RETRY, "early")
        decision = world.step()
        assert decision.status.handled_retry == "early" and decision.status.candidate.revision == 1
        assert of_type(decision, RunJob) == []
        world.finish("prune", phase="Failed")
        assert world.step().status.phase == "Failed"  # the early token does not retry the later failure


class TestSpecEdits:
    def test_a_compression_edit_mid_compression_deletes_stale_jobs_and_restarts(self):
        world = World.new()
        world.step()
        world.finish("prune")
        world.step()  # evaluate r1 g1 running
        world.edit({"compression": {"pruning": {"sparsity": 0.7}}})
        decision = world.step()
        st = decision.status
        assert [a.name for a in of_type(decision, DeleteJob)] == [
            names_of(world, "prune", 1, 1), names_of(world, "evaluate", 1, 1)]
        assert (st.candidate.revision, st.candidate.generation, st.candidate.reason) == (2, 2, "specChange")
        assert [a.name for a in of_type(decision, RunJob)] == [names_of(world, "prune", 2, 2)]
        assert events(decision) == [reasons.COMPRESSION_RESTARTED, reasons.COMPRESSION_STARTED]
        assert st.observed_generation == 2
        assert set(world.jobs) == {names_of(world, "prune", 2, 2)}

    @pytest.mark.parametrize("edit", [
        {"serving": {"replicas": 3}},
        {"drift": {"windowSize": 500}},
        {"promotion": {"requireApproval": False}},
        {"jobs": {"backoffLimit": 5}},
        {"data": {"retrain": "file:///data/newer.npz"}},
        {"revisionHistoryLimit": 5},
    ])
    def test_edits_outside_the_compression_inputs_do_not_recompress(self, edit):
        world = World.new()
        world.to_serving()
        world.edit(edit)
        decision = world.step()
        assert of_type(decision, RunJob) == [] and decision.status.phase == "Serving"
        assert decision.status.observed_generation == 2
        assert of_type(decision, Serve)[0].revision == 1

    def test_a_reference_data_edit_reaches_the_serve_action(self):
        world = World.new()
        world.to_serving()
        world.edit({"data": {"reference": "file:///data/reference.npz"}})
        assert of_type(world.step(), Serve)[0].drift_reference == "file:///data/reference.npz"
        world.edit({"drift": {"enabled": False}})
        assert of_type(world.step(), Serve)[0].drift_reference is None

    def test_a_compression_edit_while_serving_recompresses_and_keeps_serving(self):
        world = World.new()
        world.to_serving()
        world.edit({"gates": {"minAccuracy": 0.9}})
        decision = world.step()
        assert decision.status.phase == "Compressing" and decision.status.candidate.reason == "specChange"
        assert of_type(decision, Serve)[0].revision == 1
        assert condition(decision.status, "Ready").status == "True"
        world.finish("prune")
        world.step()
        world.finish("evaluate", report=make_report(2))
        promoting = world.step()
        assert promoting.status.current_revision == 2 and of_type(promoting, Serve)[0].revision == 2

    def test_an_edit_while_failed_that_changes_compression_inputs_restarts(self):
        world = World.new()
        world.step()
        world.finish("prune", phase="Failed")
        world.step()
        world.edit({"compression": {"pruning": {"sparsity": 0.3}}})
        decision = world.step()
        assert decision.status.phase == "Compressing" and decision.status.candidate.revision == 2
        # the replaced candidate's failed Job is cleaned up with it
        assert [a.name for a in of_type(decision, DeleteJob)] == [names_of(world, "prune", 1, 1)]


def test_history_keeps_at_most_the_limit_but_always_baseline_serving_and_newest():
    world = World.new({"revisionHistoryLimit": 3})
    world.to_serving()  # revisions 0, 1 (serving)
    for sparsity in (0.6, 0.7, 0.8):  # three rejected recompressions: revisions 2, 3, 4
        world.edit({"compression": {"pruning": {"sparsity": sparsity}}})
        world.step()
        world.finish("prune")
        world.step()
        world.finish("evaluate", report=make_report(world.status.candidate.revision, passed=False, accuracy=0.8))
        world.step()
    assert [r.revision for r in world.status.revisions] == [0, 1, 4]
    world.edit({"compression": {"pruning": {"sparsity": 0.9}}})
    assert world.step().status.candidate.revision == 5  # numbers never reused


def test_a_changed_source_model_replaces_the_baseline_unless_it_is_serving():
    world = World.new()
    world.to_serving()
    world.edit({"model": {"uri": "builtin://digits-cnn"}})
    world.step()
    world.finish("prune")
    world.step()
    cnn = make_report(2, baseline_tag="baseline-digits-cnn")
    world.finish("evaluate", report=cnn)
    assert world.step().status.revisions[0].artifact == cnn.baseline_artifact


def test_jobs_of_abandoned_work_are_deleted_and_live_ones_never():
    world = World.new()
    world.step()
    stray = names_of(world, "evaluate", 7, 1)  # e.g. left behind by a reconcile interrupted long ago
    world.apply(RunJob(kind="evaluate", name=stray, revision=7, generation=1, candidate_key="k", eval_key="e"))
    decision = world.step()
    assert [a.name for a in of_type(decision, DeleteJob)] == [stray]
    assert names_of(world, "prune", 1, 1) in world.jobs and stray not in world.jobs
