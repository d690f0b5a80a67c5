"""KServe's Python model server with a minimal ONNX Runtime model (a benchmark peer; run in its own venv).

    /tmp/bench-venvs/kserve/bin/python kserve_server.py MODEL.onnx NAME --http_port P --grpc_port G --workers N

Per-request logs (uvicorn's access log, KServe's latency log) are off, as in `kompressor serve`, so that neither
server pays for logging. ONNX Runtime uses $BENCH_ORT_THREADS intra-op threads per process (0 or unset: its
default, one per core).
"""

import json
import os
import sys
import tempfile

MODEL, NAME = sys.argv[1], sys.argv[2]
LOG_CONFIG = os.path.join(tempfile.mkdtemp(prefix="kserve-log-"), "log.json")
sys.argv = [sys.argv[0], *sys.argv[3:], "--enable_latency_logging", "false", "--log_config_file", LOG_CONFIG]

import kserve  # noqa: E402  (reads sys.argv when imported)
import kserve.logging as klog  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from kserve import InferOutput, InferRequest, InferResponse  # noqa: E402

config = json.loads(json.dumps(klog.KSERVE_LOG_CONFIG))
config["loggers"]["uvicorn.access"]["level"] = "WARNING"
config["loggers"]["kserve.trace"]["level"] = "WARNING"
with open(LOG_CONFIG, "w") as f:
    json.dump(config, f)

DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.float64): "FP64"}


class OnnxModel(kserve.Model):
    def __init__(self, name: str, path: str):
        super().__init__(name)
        self.path = path
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("BENCH_ORT_THREADS", "0"))  # 0: ORT's default
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.ready = True
        return True

    def __getstate__(self):  # --workers > 1 spawns processes and pickles the model: each loads its own session
        state = dict(self.__dict__)
        state.pop("session", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.load()

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        feeds = {i.name: i.as_numpy() for i in payload.inputs}
        answers = []
        for name, value in zip(self.outputs, self.session.run(None, feeds)):
            out = InferOutput(name=name, shape=list(value.shape), datatype=DATATYPES[value.dtype])
            out.set_data_from_numpy(value, binary_data=False)
            answers.append(out)
        return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=answers)


if __name__ == "__main__":
    kserve.ModelServer().start([OnnxModel(NAME, MODEL)])
