"""checkov (Kubernetes and Dockerfile policies) on every rendering of the chart, the plain bundle and
both Dockerfiles: zero failed checks, and every skipped check justified in the chart itself."""

from __future__ import annotations

import re


def test_no_failed_checks(checkov_report):
    assert set(checkov_report) == {"kubernetes", "dockerfile"}, "checkov scanned manifests and Dockerfiles"
    failed = [f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})"
              for report in checkov_report.values() for c in report["results"]["failed_checks"]]
    assert failed == []
    for report in checkov_report.values():
        assert report["summary"]["parsing_errors"] == 0
        assert report["summary"]["passed"] > 0


def test_checkov_saw_every_object(checkov_report, renderings):
    kubernetes = checkov_report["kubernetes"]
    files = {c["file_path"].lstrip("/") for c in kubernetes["results"]["passed_checks"]}
    assert {f"chart-{label}.yaml" for label in renderings} | {"bundle.yaml"} <= files
    docker = {c["file_path"].lstrip("/") for c in checkov_report["dockerfile"]["results"]["passed_checks"]}
    assert docker == {"operator/Dockerfile", "jobs/Dockerfile"}


def test_every_skip_is_a_justified_annotation_in_the_chart(checkov_report, renderings):
    skipped = {c["check_id"] for report in checkov_report.values() for c in report["results"]["skipped_checks"]}
    justified = {}
    for objects in renderings.values():
        for obj in objects:
            for key, value in (obj["metadata"].get("annotations") or {}).items():
                if key.startswith("checkov.io/skip"):
                    check, _, reason = value.partition("=")
                    assert re.fullmatch(r"CKV2?_K8S_\d+", check), value
                    assert len(reason.split()) >= 5, f"{value}: say why the check does not apply"
                    justified[check] = reason
    assert skipped <= set(justified), f"skipped without a reason in the chart: {skipped - set(justified)}"
