"""The operator killed (SIGKILL) and restarted at every phase boundary: no duplicate Job,
no skipped or lost revision, and it still ends up serving."""

import pytest

from kompressor.core import names
from support.cluster import digits_model

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


async def test_killed_and_restarted_at_every_phase_boundary(cluster):
    await cluster.create(digits_model("phoenix"))
    cluster.kill_operator()  # before it wrote anything
    await cluster.start_operator()
    phases = []
    while not phases or phases[-1] not in ("Serving", "Failed", "Rejected"):
        last = phases[-1] if phases else None
        await cluster.wait(lambda: cluster.status("phoenix").get("phase") not in (None, last), 180,
                           f"a phase after {last}")
        phases.append(cluster.status("phoenix")["phase"])
        cluster.kill_operator()
        await cluster.start_operator()
    assert phases[-1] == "Serving", phases
    assert {"Compressing", "Evaluating"} <= set(phases), phases
    assert sorted(cluster.job_creations("phoenix")) == sorted(
        [names.job_name("phoenix", "prune", 1, 1), names.job_name("phoenix", "evaluate", 1, 1)])
    status = cluster.status("phoenix")
    assert status["currentRevision"] == 1
    assert [r["revision"] for r in status["revisions"]] == [0, 1]  # baseline + the one compression
    assert cluster.operator_starts == len(phases) + 2
