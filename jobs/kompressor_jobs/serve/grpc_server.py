"""The Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``), beside the REST app on the
same event loop and the same ``InferenceServer``: the same model (a hot swap reaches both at once), the
same input validation, capture and metrics.

RPCs: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer. ModelInfer takes its
inputs as ``raw_input_contents`` (one entry per input, in input order; what Triton's clients send) or as
typed ``contents`` (the field of the datatype: ``fp32_contents`` for FP32, ``int_contents`` for
INT8/16/32, ...; FP16 has none, so it comes raw), and answers with ``raw_output_contents``. Errors: a bad
request gets INVALID_ARGUMENT with the message REST would give, an unknown model or version NOT_FOUND, a
message over ``--max-body-bytes`` RESOURCE_EXHAUSTED, an ONNX Runtime failure INTERNAL. ModelReady answers
``ready: false`` for a model or version not served.
"""

from __future__ import annotations

import time
import uuid

import grpc
import numpy as np

from kompressor import __version__
from kompressor_jobs.serve import oip_proto
from kompressor_jobs.serve.app import EXTENSIONS, GRPC, InferenceFailed, InferenceServer, NotFound
from kompressor_jobs.serve.oip import (
    BadRequest, FeedsBuilder, InferRequest, check_header, datatype_of, from_raw, from_values, raw_bytes,
)
from kompressor_jobs.serve.online import ROUTED

M = {name: oip_proto.message(name) for name in oip_proto.MESSAGES}
# the typed-contents field of each datatype, and the numpy type its values arrive in
CONTENTS = {
    "BOOL": ("bool_contents", np.bool_), "INT8": ("int_contents", np.int32), "INT16": ("int_contents", np.int32),
    "INT32": ("int_contents", np.int32), "INT64": ("int64_contents", np.int64),
    "UINT8": ("uint_contents", np.uint32), "UINT16": ("uint_contents", np.uint32),
    "UINT32": ("uint_contents", np.uint32), "UINT64": ("uint64_contents", np.uint64),
    "FP32": ("fp32_contents", np.float32), "FP64": ("fp64_contents", np.float64),
}


def decode_infer(request, model) -> InferRequest:
    """A ModelInferRequest as feeds for the model, through the same checks as a REST request."""
    if not request.inputs:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; give one per "
                         f"input, in input order, or none")
    builder = FeedsBuilder(model)
    for i, tensor in enumerate(request.inputs):
        spec = builder.spec(tensor.name, f"inputs[{i}]")
        shape = check_header(spec.name, tensor.datatype, list(tensor.shape), spec)
        if raw:
            if tensor.HasField("contents"):
                raise BadRequest(f"input {spec.name!r}: 'contents' given with raw_input_contents; use one or the "
                                 f"other")
            array = from_raw(raw[i], tensor.datatype, shape, spec)
        else:
            array = from_values(_typed_contents(tensor, spec.name), tensor.datatype, shape, spec)
        builder.add(spec.name, array)
    feeds = builder.done()
    outputs = None
    if request.outputs:
        outputs = [o.name for o in request.outputs]
        unknown = [n for n in outputs if n not in model.output_names]
        if unknown:
            raise BadRequest(f"unknown output(s): {', '.join(unknown)} (outputs: {', '.join(model.output_names)})")
        for o in request.outputs:
            if "classification" in o.parameters:
                raise BadRequest(f"output {o.name!r}: the classification extension is not supported")
    return InferRequest(feeds, outputs, request.id or None)


def _typed_contents(tensor, name: str) -> np.ndarray:
    field, dtype = CONTENTS.get(tensor.datatype, (None, None))
    given = [f.name for f, _ in tensor.contents.ListFields()]
    if field is None:
        raise BadRequest(f"input {name!r}: {tensor.datatype} has no typed contents field; send it in "
                         f"raw_input_contents")
    if not given:
        raise BadRequest(f"input {name!r}: no data: set contents.{field} or raw_input_contents")
    if given != [field]:
        raise BadRequest(f"input {name!r}: {tensor.datatype} values go in contents.{field}, got "
                         f"{', '.join('contents.' + g for g in given)}")
    return np.array(getattr(tensor.contents, field), dtype=dtype)


class GrpcService:
    """The RPC handlers, over one InferenceServer."""

    def __init__(self, server: InferenceServer):
        self.server = server

    async def server_live(self, request, context):
        return M["ServerLiveResponse"](live=True)

    async def server_ready(self, request, context):
        return M["ServerReadyResponse"](ready=True)

    async def model_ready(self, request, context):
        try:
            self.server.find(request.name, request.version)
        except NotFound:
            return M["ModelReadyResponse"](ready=False)
        return M["ModelReadyResponse"](ready=True)

    async def server_metadata(self, request, context):
        return M["ServerMetadataResponse"](name="kompressor", version=__version__, extensions=EXTENSIONS)

    async def model_metadata(self, request, context):
        try:
            model = self.server.find(request.name, request.version)
        except NotFound as err:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(err))
        meta = model.metadata(self.server.name)
        tensor = M["ModelMetadataResponse.TensorMetadata"]
        return M["ModelMetadataResponse"](
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]], outputs=[tensor(**t) for t in meta["outputs"]])

    async def model_infer(self, request, context):
        with self.server.in_flight.track_inprogress():
            return await self._model_infer(request, context)

    async def _model_infer(self, request, context):
        started = time.perf_counter()
        server = self.server
        model = server.model  # this request finishes on this model even if a swap happens meanwhile
        try:
            model = server.find(request.model_name, request.model_version)
            decoded = decode_infer(request, model)
            if server.feedback is not None and decoded.request_id is None:  # labels need an id: one is assigned
                decoded.request_id = uuid.uuid4().hex
            results = await server.run(model, decoded)
        except NotFound as err:
            await self._abort(context, model, grpc.StatusCode.NOT_FOUND, str(err))
        except BadRequest as err:
            await self._abort(context, model, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except InferenceFailed as err:
            await self._abort(context, model, grpc.StatusCode.INTERNAL, str(err))
        routed = getattr(decoded, ROUTED, None)
        if routed is not None:
            model = routed.model  # canary: the candidate may have answered
        names = decoded.outputs or model.output_names
        response = M["ModelInferResponse"](model_name=server.name, model_version=model.version,
                                           id=decoded.request_id or "")
        for name, result in zip(names, results):
            out = response.outputs.add()
            out.name, out.datatype = name, datatype_of(result)
            out.shape.extend(result.shape)
            response.raw_output_contents.append(raw_bytes(result))
        server.served(model, decoded, names, results, started, GRPC)
        return response

    async def _abort(self, context, model, code: grpc.StatusCode, message: str) -> None:
        self.server.failed(model, GRPC, code.name)
        await context.abort(code, message)

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {"ServerLive": self.server_live, "ServerReady": self.server_ready, "ModelReady": self.model_ready,
                   "ServerMetadata": self.server_metadata, "ModelMetadata": self.model_metadata,
                   "ModelInfer": self.model_infer}
        handlers = {}
        for rpc, method in methods.items():
            request, response = oip_proto.RPCS[rpc]
            handlers[rpc] = grpc.unary_unary_rpc_method_handler(
                method, request_deserializer=M[request].FromString, response_serializer=M[response].SerializeToString)
        return grpc.method_handlers_generic_handler(f"{oip_proto.PACKAGE}.{oip_proto.SERVICE}", handlers)


def grpc_server(server: InferenceServer, host: str, port: int, max_message_bytes: int,
                reuse_port: bool = False) -> grpc.aio.Server:
    """A grpc.aio server for ``server`` listening on host:port (start it from the running event loop). OSError
    when the port cannot be bound."""
    aio = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", -1),
        # gRPC sets SO_REUSEPORT by default: a second server on the same port would then start silently
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ])
    aio.add_generic_rpc_handlers((GrpcService(server).handler(),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = aio.add_insecure_port(address)
    except RuntimeError as err:
        raise OSError(f"cannot bind gRPC to {address}: {err}") from None
    if not bound:
        raise OSError(f"cannot bind gRPC to {address}")
    return aio
