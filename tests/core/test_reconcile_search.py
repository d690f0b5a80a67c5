"""The status says so when the evaluate Job's eval run disagreed with the search's validation choice."""

from dataclasses import replace

from reconcile_world import World, condition, make_report

from kompressor.api.report import EvalReport


def evaluated(report):
    world = World.new()
    world.step()
    world.finish("prune")
    world.step()
    world.finish("evaluate", report=report)
    return world.step().status


def test_eval_disagreeing_with_validation_is_in_the_compressed_condition():
    search = {"validationChoice": 0.9, "evalDisagreed": [0.9], "fellBack": True, "chosenSparsity": 0.8,
              "probesOnEval": 2}
    report = replace(make_report(1, sparsity=0.8), search=search)
    assert EvalReport.from_json(report.to_json()).search == search  # metrics.json carries it to the operator
    message = condition(evaluated(report), "Compressed").message
    assert "eval disagreed with validation on sparsity 0.9" in message
    assert "next passing probe (0.8) was kept" in message and "2 candidates touched the eval data" in message


def test_running_out_of_kept_probes_is_in_the_compressed_condition():
    why = ("every kept probe that passed on validation (0.9, 0.8) failed on eval; 1 more passed on validation (0.7) "
           "but was not kept (compression.search.maxAlternates: 1), so none is left to try")
    search = {"validationChoice": 0.9, "evalDisagreed": [0.9, 0.8], "fellBack": False, "chosenSparsity": 0.9,
              "probesOnEval": 2, "notKept": [0.7], "message": why}
    message = condition(evaluated(replace(make_report(1, sparsity=0.9), search=search)), "Compressed").message
    assert why in message


def test_an_agreeing_search_adds_nothing():
    report = replace(make_report(1), search={"evalDisagreed": [], "probesOnEval": 1, "fellBack": False})
    assert "disagreed" not in condition(evaluated(report), "Compressed").message
