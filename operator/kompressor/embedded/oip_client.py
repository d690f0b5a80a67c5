"""A minimal Open Inference Protocol v2 REST client (what KServe/Triton clients send), for the demo."""

from __future__ import annotations

import time
from dataclasses import dataclass

import aiohttp


@dataclass
class InferResult:
    outputs: list[list[float]]  # one row of scores per input row
    model_version: str | None
    latency_ms: float


class OIPError(RuntimeError):
    pass


class OIPClient:
    def __init__(self, base_url: str, model: str, session: aiohttp.ClientSession):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.http = session
        self.input_name: str | None = None

    async def metadata(self) -> dict:
        async with self.http.get(f"{self.base_url}/v2/models/{self.model}") as response:
            if response.status != 200:
                raise OIPError(f"model metadata: HTTP {response.status}: {await response.text()}")
            return await response.json()

    async def infer(self, rows: list[list[float]], request_id: str | None = None) -> InferResult:
        if self.input_name is None:
            self.input_name = (await self.metadata())["inputs"][0]["name"]
        width = len(rows[0])
        body = {"inputs": [{"name": self.input_name, "shape": [len(rows), width], "datatype": "FP32",
                            "data": [v for row in rows for v in row]}]}
        if request_id:
            body["id"] = request_id
        started = time.perf_counter()
        async with self.http.post(f"{self.base_url}/v2/models/{self.model}/infer", json=body) as response:
            payload = await response.json(content_type=None)
            latency = (time.perf_counter() - started) * 1000
            if response.status != 200:
                raise OIPError(f"infer: HTTP {response.status}: {payload}")
        output = payload["outputs"][0]
        classes = output["shape"][-1]
        flat = output["data"]
        return InferResult(outputs=[flat[i:i + classes] for i in range(0, len(flat), classes)],
                           model_version=payload.get("model_version"), latency_ms=latency)
