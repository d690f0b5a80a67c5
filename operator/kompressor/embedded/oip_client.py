"""A minimal Open Inference Protocol v2 REST client (what KServe/Triton clients send), for the demo.

``infer`` sends rows of one FP32 input; ``infer_tensors`` sends several named inputs, each in the datatype
the model's metadata declares (INT64 token ids, an INT32 mask, FP16, BOOL, FP32...), and returns every
output reshaped to its shape. No numpy: nested lists in, nested lists out."""

from __future__ import annotations

import time
from dataclasses import dataclass

import aiohttp


@dataclass
class InferResult:
    outputs: list[list[float]]  # one row of scores per input row
    model_version: str | None
    latency_ms: float


@dataclass
class TensorResult:
    tensors: dict[str, list]  # output name -> nested list shaped like the output
    datatypes: dict[str, str]  # output name -> OIP datatype
    model_version: str | None
    latency_ms: float


class OIPError(RuntimeError):
    pass


def _shape(value) -> list[int]:
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        value = value[0] if value else None
    return shape


def _flatten(value) -> list:
    if not isinstance(value, list):
        return [value]
    return [v for item in value for v in _flatten(item)]


def _nest(flat: list, shape: list[int]) -> list:
    if len(shape) <= 1:
        return list(flat)
    step = len(flat) // shape[0] if shape[0] else 0
    return [_nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


class OIPClient:
    def __init__(self, base_url: str, model: str, session: aiohttp.ClientSession):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.http = session
        self.input_name: str | None = None
        self.input_datatypes: dict[str, str] | None = None

    async def metadata(self) -> dict:
        async with self.http.get(f"{self.base_url}/v2/models/{self.model}") as response:
            if response.status != 200:
                raise OIPError(f"model metadata: HTTP {response.status}: {await response.text()}")
            return await response.json()

    async def _post_infer(self, body: dict, request_id: str | None) -> tuple[dict, float]:
        """POST an OIP v2 infer body; the response payload and the round-trip latency in ms."""
        if request_id:
            body["id"] = request_id
        started = time.perf_counter()
        async with self.http.post(f"{self.base_url}/v2/models/{self.model}/infer", json=body) as response:
            payload = await response.json(content_type=None)
            latency = (time.perf_counter() - started) * 1000
            if response.status != 200:
                detail = payload.get("error", payload) if isinstance(payload, dict) else payload
                raise OIPError(f"infer: HTTP {response.status}: {detail}")
        return payload, latency

    async def infer(self, rows: list[list[float]], request_id: str | None = None) -> InferResult:
        if self.input_name is None:
            self.input_name = (await self.metadata())["inputs"][0]["name"]
        width = len(rows[0])
        body = {"inputs": [{"name": self.input_name, "shape": [len(rows), width], "datatype": "FP32",
                            "data": [v for row in rows for v in row]}]}
        payload, latency = await self._post_infer(body, request_id)
        output = payload["outputs"][0]
        classes = output["shape"][-1]
        flat = output["data"]
        return InferResult(outputs=[flat[i:i + classes] for i in range(0, len(flat), classes)],
                           model_version=payload.get("model_version"), latency_ms=latency)

    async def infer_tensors(self, inputs: dict[str, list], request_id: str | None = None) -> TensorResult:
        """Several named inputs (nested lists, one row per batch item) in the model's declared datatypes."""
        if self.input_datatypes is None:
            self.input_datatypes = {i["name"]: i["datatype"] for i in (await self.metadata())["inputs"]}
        unknown = [name for name in inputs if name not in self.input_datatypes]
        if unknown:
            raise OIPError(f"unknown input(s) {', '.join(unknown)} (model inputs: "
                           f"{', '.join(self.input_datatypes)})")
        body: dict = {"inputs": [{"name": name, "datatype": self.input_datatypes[name], "shape": _shape(value),
                                  "data": _flatten(value)} for name, value in inputs.items()]}
        payload, latency = await self._post_infer(body, request_id)
        outputs = payload["outputs"]
        return TensorResult(tensors={o["name"]: _nest(o["data"], o["shape"]) for o in outputs},
                            datatypes={o["name"]: o["datatype"] for o in outputs},
                            model_version=payload.get("model_version"), latency_ms=latency)
