"""The Open Inference Protocol v2 gRPC messages (package ``inference``, service ``GRPCInferenceService``),
built at import time from the table below: no protoc, no generated ``_pb2`` modules to keep in step with
the protobuf runtime.

The table states the part of the protocol this server implements (the health, metadata and inference
RPCs), with the message names, field names, numbers and types of KServe's ``grpc_predict_v2.proto`` and
Triton's ``grpc_service.proto`` (the same messages on the wire; Triton adds ``double_param`` and
``uint64_param`` to ``InferParameter``, kept here too). It was written from the protocol's specification,
and ``tests/serving/test_grpc.py`` checks it field by field against the descriptors that Triton's own
client (``tritonclient.grpc``) ships. The messages live in a private descriptor pool, so they never clash
with another copy of the protocol (tritonclient's, KServe's) imported into the same process.

``python -m kompressor_jobs.serve.oip_proto`` prints the table as a ``.proto`` file, for generating clients
in other languages.
"""

from __future__ import annotations

import sys

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "inference"
SERVICE = "GRPCInferenceService"
FILE = "kompressor_oip_v2.proto"

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "bool": _F.TYPE_BOOL, "string": _F.TYPE_STRING, "bytes": _F.TYPE_BYTES, "int32": _F.TYPE_INT32,
    "int64": _F.TYPE_INT64, "uint32": _F.TYPE_UINT32, "uint64": _F.TYPE_UINT64, "float": _F.TYPE_FLOAT,
    "double": _F.TYPE_DOUBLE,
}
PARAMETERS = "map<string, InferParameter>"

# message: [(field, number, type, "repeated" | "" | oneof name)], nested messages as "Outer.Inner";
# a map field is given as PARAMETERS (map<string, InferParameter>, the only map the protocol has).
MESSAGES: dict[str, list[tuple[str, int, str, str]]] = {
    "ServerLiveRequest": [],
    "ServerLiveResponse": [("live", 1, "bool", "")],
    "ServerReadyRequest": [],
    "ServerReadyResponse": [("ready", 1, "bool", "")],
    "ModelReadyRequest": [("name", 1, "string", ""), ("version", 2, "string", "")],
    "ModelReadyResponse": [("ready", 1, "bool", "")],
    "ServerMetadataRequest": [],
    "ServerMetadataResponse": [("name", 1, "string", ""), ("version", 2, "string", ""),
                               ("extensions", 3, "string", "repeated")],
    "ModelMetadataRequest": [("name", 1, "string", ""), ("version", 2, "string", "")],
    "ModelMetadataResponse": [("name", 1, "string", ""), ("versions", 2, "string", "repeated"),
                              ("platform", 3, "string", ""),
                              ("inputs", 4, "ModelMetadataResponse.TensorMetadata", "repeated"),
                              ("outputs", 5, "ModelMetadataResponse.TensorMetadata", "repeated")],
    "ModelMetadataResponse.TensorMetadata": [("name", 1, "string", ""), ("datatype", 2, "string", ""),
                                             ("shape", 3, "int64", "repeated")],
    "ModelInferRequest": [("model_name", 1, "string", ""), ("model_version", 2, "string", ""),
                          ("id", 3, "string", ""), ("parameters", 4, PARAMETERS, ""),
                          ("inputs", 5, "ModelInferRequest.InferInputTensor", "repeated"),
                          ("outputs", 6, "ModelInferRequest.InferRequestedOutputTensor", "repeated"),
                          ("raw_input_contents", 7, "bytes", "repeated")],
    "ModelInferRequest.InferInputTensor": [("name", 1, "string", ""), ("datatype", 2, "string", ""),
                                           ("shape", 3, "int64", "repeated"), ("parameters", 4, PARAMETERS, ""),
                                           ("contents", 5, "InferTensorContents", "")],
    "ModelInferRequest.InferRequestedOutputTensor": [("name", 1, "string", ""), ("parameters", 2, PARAMETERS, "")],
    "ModelInferResponse": [("model_name", 1, "string", ""), ("model_version", 2, "string", ""),
                           ("id", 3, "string", ""), ("parameters", 4, PARAMETERS, ""),
                           ("outputs", 5, "ModelInferResponse.InferOutputTensor", "repeated"),
                           ("raw_output_contents", 6, "bytes", "repeated")],
    "ModelInferResponse.InferOutputTensor": [("name", 1, "string", ""), ("datatype", 2, "string", ""),
                                             ("shape", 3, "int64", "repeated"), ("parameters", 4, PARAMETERS, ""),
                                             ("contents", 5, "InferTensorContents", "")],
    "InferParameter": [("bool_param", 1, "bool", "parameter_choice"), ("int64_param", 2, "int64", "parameter_choice"),
                       ("string_param", 3, "string", "parameter_choice"),
                       ("double_param", 4, "double", "parameter_choice"),
                       ("uint64_param", 5, "uint64", "parameter_choice")],
    "InferTensorContents": [("bool_contents", 1, "bool", "repeated"), ("int_contents", 2, "int32", "repeated"),
                            ("int64_contents", 3, "int64", "repeated"), ("uint_contents", 4, "uint32", "repeated"),
                            ("uint64_contents", 5, "uint64", "repeated"), ("fp32_contents", 6, "float", "repeated"),
                            ("fp64_contents", 7, "double", "repeated"), ("bytes_contents", 8, "bytes", "repeated")],
}
# rpc: (request, response)
RPCS = {
    "ServerLive": ("ServerLiveRequest", "ServerLiveResponse"),
    "ServerReady": ("ServerReadyRequest", "ServerReadyResponse"),
    "ModelReady": ("ModelReadyRequest", "ModelReadyResponse"),
    "ServerMetadata": ("ServerMetadataRequest", "ServerMetadataResponse"),
    "ModelMetadata": ("ModelMetadataRequest", "ModelMetadataResponse"),
    "ModelInfer": ("ModelInferRequest", "ModelInferResponse"),
}


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto(name=FILE, package=PACKAGE, syntax="proto3")
    protos: dict[str, descriptor_pb2.DescriptorProto] = {}
    for path in MESSAGES:  # outer messages come before their nested ones in the table
        outer, _, inner = path.rpartition(".")
        protos[path] = (protos[outer].nested_type.add(name=inner) if outer else fd.message_type.add(name=path))
    for path, fields in MESSAGES.items():
        message = protos[path]
        oneofs: list[str] = []
        for name, number, kind, mode in fields:
            field = message.field.add(name=name, number=number, json_name=_camel(name))
            if kind == PARAMETERS:
                entry = message.nested_type.add(name=_camel(name, upper=True) + "Entry")
                entry.options.map_entry = True
                entry.field.add(name="key", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL, json_name="key")
                entry.field.add(name="value", number=2, type=_F.TYPE_MESSAGE, label=_F.LABEL_OPTIONAL,
                                type_name=f".{PACKAGE}.InferParameter", json_name="value")
                field.type, field.label = _F.TYPE_MESSAGE, _F.LABEL_REPEATED
                field.type_name = f".{PACKAGE}.{path}.{entry.name}"
                continue
            field.label = _F.LABEL_REPEATED if mode == "repeated" else _F.LABEL_OPTIONAL
            if kind in _SCALARS:
                field.type = _SCALARS[kind]
            else:
                field.type, field.type_name = _F.TYPE_MESSAGE, f".{PACKAGE}.{kind}"
            if mode not in ("", "repeated"):
                if mode not in oneofs:
                    oneofs.append(mode)
                    message.oneof_decl.add(name=mode)
                field.oneof_index = oneofs.index(mode)
    service = fd.service.add(name=SERVICE)
    for rpc, (request, response) in RPCS.items():
        service.method.add(name=rpc, input_type=f".{PACKAGE}.{request}", output_type=f".{PACKAGE}.{response}")
    return fd


def _camel(name: str, upper: bool = False) -> str:
    head, *rest = name.split("_")
    text = head + "".join(part.title() for part in rest)
    return text[:1].upper() + text[1:] if upper else text


_POOL = descriptor_pool.DescriptorPool()
_POOL.AddSerializedFile(_file_descriptor().SerializeToString())
DESCRIPTOR = _POOL.FindFileByName(FILE)


def message(path: str):
    """The message class of ``path`` ("ModelInferRequest", "ModelInferResponse.InferOutputTensor")."""
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.{path}"))


def proto_text() -> str:
    """The messages and the service as a ``.proto`` file."""
    lines = ['syntax = "proto3";', f"package {PACKAGE};", "", f"service {SERVICE} {{"]
    lines += [f"  rpc {rpc}({req}) returns ({resp}) {{}}" for rpc, (req, resp) in RPCS.items()]
    lines.append("}")

    def render(path: str, indent: str) -> None:
        name = path.rpartition(".")[2]
        lines.extend(([""] if not indent else []) + [f"{indent}message {name} {{"])
        for child in (p for p in MESSAGES if p.rpartition(".")[0] == path):
            render(child, indent + "  ")
        oneof = None
        for field, number, kind, mode in MESSAGES[path]:
            if mode not in ("", "repeated") and mode != oneof:
                oneof = mode
                lines.append(f"{indent}  oneof {mode} {{")
            elif oneof and mode != oneof:
                lines.append(f"{indent}  }}")
                oneof = None
            label = "repeated " if mode == "repeated" else ""
            pad = "  " if oneof else ""
            lines.append(f"{indent}  {pad}{label}{kind.rpartition('.')[2] if kind != PARAMETERS else kind} "
                         f"{field} = {number};")
        if oneof:
            lines.append(f"{indent}  }}")
        lines.append(f"{indent}}}")

    for path in MESSAGES:
        if "." not in path:
            render(path, "")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(proto_text())
