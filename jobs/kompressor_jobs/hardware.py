"""Where the job runs: device selection and the hardware facts recorded in manifests."""

from __future__ import annotations

import platform
from pathlib import Path

from kompressor.errors import UserError

DEVICES = ("auto", "cpu", "cuda")
CPU_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "neon", "asimd")


def select_device(requested: str, cuda_available: bool | None = None) -> str:
    """``auto``: CUDA when torch sees a GPU (CUDA_VISIBLE_DEVICES applies), else CPU.
    ``cuda`` without a visible GPU is an error rather than a silent CPU run."""
    if requested not in DEVICES:
        raise UserError(f"--device must be one of {', '.join(DEVICES)}, got {requested!r}")
    if cuda_available is None:
        try:
            import torch
        except ImportError:  # an ONNX-only image quantizes and evaluates on the CPU
            torch = None
        cuda_available = torch is not None and torch.cuda.is_available()
    if requested == "cpu":
        return "cpu"
    if cuda_available:
        return "cuda"
    if requested == "cuda":
        raise UserError("--device cuda: no CUDA device is visible (check the GPU request, the driver and "
                        "CUDA_VISIBLE_DEVICES), and this torch build reports none")
    return "cpu"


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """Instruction-set extensions that matter for ONNX Runtime kernels (AVX2, AVX-512, VNNI...)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            present = set(value.split())
            return [flag for flag in CPU_FLAGS if flag in present]
    return []


def cpu_model(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or platform.machine()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return platform.processor() or platform.machine()


def hardware(device: str) -> dict:
    """What the manifest records about the machine that made the artifact."""
    facts = {"device": device, "machine": platform.machine(), "cpu": cpu_model(), "cpuFlags": cpu_flags()}
    if device.startswith("cuda"):
        import torch

        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["cudaVersion"] = torch.version.cuda
    return facts
