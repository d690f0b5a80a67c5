"""MLServer with a minimal ONNX Runtime model (a benchmark peer; run in its own venv by bench/serving_load.py, which
writes the settings: ``mlserver start FOLDER`` with ``implementation: mlserver_runtime.OnnxRuntime`` and this folder
on PYTHONPATH). ONNX Runtime uses $BENCH_ORT_THREADS intra-op threads per
process (0 or unset: its default, one per core); ``debug: false`` turns the access log off."""

import os

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("BENCH_ORT_THREADS", "0"))  # 0: ORT's default
        self.session = ort.InferenceSession(self.settings.parameters.uri, options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        values = self.session.run(None, feeds)
        return InferenceResponse(model_name=self.name, id=payload.id,
                                 outputs=[NumpyCodec.encode_output(n, v) for n, v in zip(self.output_names, values)])
