"""The serving job's import path (REST, binary tensors, gRPC) and a loaded model never pull in torch: a serving
image can leave it out."""

import subprocess
import sys


def test_serving_and_grpc_import_no_torch(artifacts):
    code = (
        "import sys, kompressor.cli, kompressor_jobs.serve, kompressor_jobs.serve.app, kompressor_jobs.serve.oip, "
        "kompressor_jobs.serve.grpc_server, kompressor_jobs.serve.oip_proto, kompressor_jobs.serve.workers, "
        "kompressor_jobs.serve.batching;"
        "from kompressor_jobs.serve.model import LoadedModel;"
        f"LoadedModel({str(artifacts[1])!r}).warm_up();"
        "print([m for m in ('torch', 'alibi_detect', 'sklearn', 'tritonclient') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
