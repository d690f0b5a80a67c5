"""The floor for an HTTP server: aiohttp, one route, JSON in, ``session.run``, JSON out (no validation, metrics or
capture). Run with the project's venv: ``python bare_server.py MODEL.onnx PORT``."""

import sys

import numpy as np
import onnxruntime as ort
from aiohttp import web

NUMPY = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


def main(model: str, port: int) -> None:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]

    async def infer(request: web.Request) -> web.Response:
        body = await request.json()
        feeds = {t["name"]: np.asarray(t["data"], dtype=NUMPY[t["datatype"]]).reshape(t["shape"])
                 for t in body["inputs"]}
        return web.json_response({"model_name": "m", "outputs": [
            {"name": n, "datatype": "FP32", "shape": list(v.shape), "data": v.reshape(-1).tolist()}
            for n, v in zip(outputs, session.run(None, feeds))]})

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v2/models/m/infer", infer)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2/models/m/ready", ready)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
