"""Open Inference Protocol v2 request decoding and response encoding: JSON, the binary tensor extension of
REST (``Inference-Header-Content-Length``, ``binary_data_size``), and raw bytes as gRPC carries them.

Decoding is strict and the same whatever the protocol: every problem raises ``BadRequest`` with a message
naming the tensor and what is wrong, so the server answers 400 (gRPC: INVALID_ARGUMENT) and never captures
or runs a malformed request. A tensor comes in as values (JSON numbers, gRPC typed contents) or as raw
little-endian bytes (REST binary data, gRPC ``raw_input_contents``); both go through the same checks of
datatype, shape, range and finiteness, and the same exact conversion to the model's input type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from kompressor_jobs.serve.model import NUMPY_TO_OIP, OIP_TO_NUMPY, LoadedModel, TensorSpec

OIP_DATATYPES = (*OIP_TO_NUMPY, "BYTES")
_FLOAT = ("FP16", "FP32", "FP64")
HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary tensor extension's header
BINARY_SIZE = "binary_data_size"


class BadRequest(ValueError):
    """The request is malformed; the message goes back to the client with HTTP 400."""


@dataclass
class InferRequest:
    """A decoded, validated inference request, whatever protocol brought it."""

    feeds: dict[str, np.ndarray]  # ORT feeds, in the model's input types
    outputs: list[str] | None  # requested outputs, None for all
    request_id: Any = None
    binary_outputs: frozenset[str] = frozenset()  # REST: outputs to send as binary data

    @property
    def rows(self) -> int:
        first = next(iter(self.feeds.values()))
        return first.shape[0] if first.ndim else 1


# ---- one tensor -------------------------------------------------------------------------------------------

def check_header(name: str, datatype: Any, shape: Any, spec: TensorSpec) -> list[int]:
    """Datatype and shape of an input against the model's; the shape as a list."""
    if datatype not in OIP_DATATYPES:
        raise BadRequest(f"input {name!r}: unknown datatype {datatype!r} (OIP v2: {', '.join(OIP_DATATYPES)})")
    if datatype == "BYTES" or spec.datatype not in OIP_TO_NUMPY:
        raise BadRequest(f"input {name!r}: datatype {datatype} is not accepted; the model takes {spec.datatype}")
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise BadRequest(f"input {name!r}: 'shape' must be a non-empty list of positive integers")
    if len(shape) != len(spec.shape) or any(m not in (-1, d) for m, d in zip(spec.shape, shape)):
        raise BadRequest(f"input {name!r}: shape {shape} does not fit the model's {list(spec.shape)}")
    return shape


def from_values(values: np.ndarray, datatype: str, shape: list[int], spec: TensorSpec) -> np.ndarray:
    """An input given as values (JSON numbers, gRPC typed contents), checked and converted to the model's type."""
    name = spec.name
    expected = math.prod(shape)
    if values.ndim > 1 and list(values.shape) != shape:
        raise BadRequest(f"input {name!r}: nested data has shape {list(values.shape)}, but 'shape' says {shape}")
    if values.size != expected:
        raise BadRequest(f"input {name!r}: {values.size} values given, shape {shape} needs {expected}")
    array = _as_datatype(values, datatype, name).reshape(shape)
    return _to_model_type(array, datatype, spec)


def from_raw(raw: bytes | memoryview, datatype: str, shape: list[int], spec: TensorSpec) -> np.ndarray:
    """An input given as raw bytes (flat, row-major, little-endian; BOOL one byte per value), checked and
    converted to the model's type."""
    name = spec.name
    dtype = np.dtype(OIP_TO_NUMPY[datatype]).newbyteorder("<")
    needed = math.prod(shape) * dtype.itemsize
    if len(raw) != needed:
        raise BadRequest(f"input {name!r}: {len(raw)} bytes of binary data given, shape {shape} of {datatype} "
                         f"needs {needed}")
    if datatype == "BOOL":
        octets = np.frombuffer(raw, np.uint8)
        if octets.size and octets.max() > 1:
            raise BadRequest(f"input {name!r}: BOOL binary data must hold only the bytes 0 and 1")
        values = octets.view(np.bool_)
    else:
        values = np.frombuffer(raw, dtype)
        if dtype.kind == "f" and not np.isfinite(values).all():
            raise BadRequest(f"input {name!r}: NaN or infinite values are not accepted")
        values = values.astype(dtype.newbyteorder("="), copy=False)
    if values.ctypes.data % max(1, values.dtype.itemsize):
        values = values.copy()  # unaligned inside the request body
    return _to_model_type(values.reshape(shape), datatype, spec)


def _json_values(data: Any, name: str) -> np.ndarray:
    if not isinstance(data, list):
        raise BadRequest(f"input {name!r}: 'data' must be a list (flat or nested)")
    try:
        values = np.array(data)
    except ValueError:
        raise BadRequest(f"input {name!r}: nested 'data' is ragged") from None
    if values.dtype.kind not in "biuf":
        raise BadRequest(f"input {name!r}: 'data' must hold only numbers (or only booleans), and nested "
                         f"lists must be regular")
    return values


def _as_datatype(values: np.ndarray, datatype: str, name: str) -> np.ndarray:
    """The values as the declared datatype, refusing anything the declaration does not allow."""
    dtype = np.dtype(OIP_TO_NUMPY[datatype])
    kind = values.dtype.kind
    if datatype == "BOOL":
        if kind != "b":
            raise BadRequest(f"input {name!r}: datatype BOOL needs true/false values")
        return values
    if kind == "b":
        raise BadRequest(f"input {name!r}: booleans given for datatype {datatype}")
    if datatype in _FLOAT:
        if kind == "f" and not np.isfinite(values).all():
            raise BadRequest(f"input {name!r}: NaN or infinite values are not accepted")
        if values.size and np.abs(values).max() > np.finfo(dtype).max:
            raise BadRequest(f"input {name!r}: values overflow {datatype}")
        return values.astype(dtype, copy=False)
    if kind == "f":
        raise BadRequest(f"input {name!r}: non-integer values given for datatype {datatype}")
    info = np.iinfo(dtype)
    if values.size and (values.min() < info.min or values.max() > info.max):
        raise BadRequest(f"input {name!r}: values outside the range of {datatype}")
    return values.astype(dtype, copy=False)


def _to_model_type(array: np.ndarray, datatype: str, spec: TensorSpec) -> np.ndarray:
    """Convert to the model's input type where no value changes (float narrowing: where every value
    stays finite, as JSON numbers are doubles anyway)."""
    if datatype == spec.datatype:
        return array
    target = np.dtype(OIP_TO_NUMPY[spec.datatype])
    if datatype == "BOOL" or spec.datatype == "BOOL":
        raise BadRequest(f"input {spec.name!r}: datatype {datatype} cannot be converted to the model's "
                         f"{spec.datatype}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = array.astype(target)
    if target.kind == "f" and array.dtype.kind == "f":
        ok = bool(np.isfinite(out).all())
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            ok = bool(np.array_equal(out.astype(array.dtype), array))
    if not ok:
        raise BadRequest(f"input {spec.name!r}: {datatype} values cannot be converted to the model's "
                         f"{spec.datatype} without changing them")
    return out


# ---- a whole request --------------------------------------------------------------------------------------

class FeedsBuilder:
    """Collects decoded inputs by name and checks the set: known, once each, none missing, one batch size."""

    def __init__(self, model: LoadedModel):
        self.specs = {s.name: s for s in model.inputs}
        self.feeds: dict[str, np.ndarray] = {}

    def spec(self, name: Any, where: str) -> TensorSpec:
        if not isinstance(name, str):
            raise BadRequest(f"{where}.name must be a string")
        if name not in self.specs:
            raise BadRequest(f"input {name!r} is not an input of the model (inputs: {', '.join(self.specs)})")
        if name in self.feeds:
            raise BadRequest(f"input {name!r} is given twice")
        return self.specs[name]

    def add(self, name: str, array: np.ndarray) -> None:
        self.feeds[name] = array

    def done(self) -> dict[str, np.ndarray]:
        missing = [n for n in self.specs if n not in self.feeds]
        if missing:
            raise BadRequest(f"missing input(s): {', '.join(missing)}")
        batches = {a.shape[0] for a in self.feeds.values() if a.ndim}
        if len(batches) > 1:
            raise BadRequest(f"inputs disagree on the batch size: {sorted(batches)}")
        return self.feeds


def decode_request(body: Any, model: LoadedModel, binary: bytes | memoryview | None = None) -> InferRequest:
    """A REST request: the JSON object, and the binary data after it (the binary tensor extension)."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    binary = memoryview(binary if binary is not None else b"")
    offset = 0
    builder = FeedsBuilder(model)
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise BadRequest(f"inputs[{i}] must be an object")
        spec = builder.spec(tensor.get("name"), f"inputs[{i}]")
        shape = check_header(spec.name, tensor.get("datatype"), tensor.get("shape"), spec)
        size = _parameters(tensor, f"input {spec.name!r}").get(BINARY_SIZE)
        if size is None:
            if "data" not in tensor:
                raise BadRequest(f"input {spec.name!r}: 'data' is missing")
            array = from_values(_json_values(tensor["data"], spec.name), tensor["datatype"], shape, spec)
        else:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadRequest(f"input {spec.name!r}: {BINARY_SIZE} must be a non-negative integer")
            if "data" in tensor:
                raise BadRequest(f"input {spec.name!r}: both 'data' and {BINARY_SIZE} are given")
            if offset + size > len(binary):
                raise BadRequest(f"input {spec.name!r}: {BINARY_SIZE} {size} goes past the end of the binary data "
                                 f"({len(binary)} bytes after the JSON header"
                                 + ("" if len(binary) else f"; is the {HEADER_LENGTH} header set?") + ")")
            array = from_raw(binary[offset:offset + size], tensor["datatype"], shape, spec)
            offset += size
        builder.add(spec.name, array)
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data are not claimed by any input's "
                         f"{BINARY_SIZE}")
    feeds = builder.done()
    outputs, binary_outputs = _requested_outputs(body, model)
    return InferRequest(feeds, outputs, request_id, binary_outputs)


def _parameters(holder: dict, what: str) -> dict:
    params = holder.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadRequest(f"{what}: 'parameters' must be an object")
    return params


def _flag(params: dict, key: str, what: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{what}: parameter {key} must be true or false")
    return value


def _requested_outputs(body: dict, model: LoadedModel) -> tuple[list[str] | None, frozenset[str]]:
    """(requested output names or None for all, the outputs to send as binary data)."""
    all_binary = _flag(_parameters(body, "request"), "binary_data_output", "request", False)
    outputs = body.get("outputs")
    if outputs is None:
        return None, frozenset(model.output_names if all_binary else ())
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                for o in outputs):
        raise BadRequest("'outputs' must be a list of objects with a 'name'")
    names = [o["name"] for o in outputs]
    unknown = [n for n in names if n not in model.output_names]
    if unknown:
        raise BadRequest(f"unknown output(s): {', '.join(unknown)} (outputs: {', '.join(model.output_names)})")
    binary = set()
    for o in outputs:
        params = _parameters(o, f"output {o['name']!r}")
        if "classification" in params:
            raise BadRequest(f"output {o['name']!r}: the classification extension is not supported")
        if _flag(params, "binary_data", f"output {o['name']!r}", all_binary):
            binary.add(o["name"])
    return names, frozenset(binary)


# ---- responses --------------------------------------------------------------------------------------------

def datatype_of(array: np.ndarray) -> str:
    return NUMPY_TO_OIP.get(array.dtype, "BYTES")


def raw_bytes(array: np.ndarray) -> bytes:
    """A tensor as the binary tensor extension and gRPC raw contents carry it: flat, row-major, little-endian;
    BOOL one byte per value; BYTES each element as a 4-byte little-endian length and its bytes."""
    if datatype_of(array) == "BYTES":
        parts = []
        for item in array.reshape(-1).tolist():
            data = item if isinstance(item, bytes) else str(item).encode()
            parts += [len(data).to_bytes(4, "little"), data]
        return b"".join(parts)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array).tobytes()


def encode_response(name: str, model: LoadedModel, output_names: list[str], results: list[np.ndarray],
                    request_id: Any, binary_outputs: frozenset[str] = frozenset()) -> tuple[dict, list[bytes]]:
    """(the JSON response, the binary data to send after it, one chunk per binary output in output order)."""
    chunks: list[bytes] = []
    tensors = []
    for n, r in zip(output_names, results):
        tensor = {"name": n, "datatype": datatype_of(r), "shape": list(r.shape)}
        if n in binary_outputs:
            chunks.append(raw_bytes(r))
            tensor["parameters"] = {BINARY_SIZE: len(chunks[-1])}
        else:
            tensor["data"] = r.reshape(-1).tolist()
        tensors.append(tensor)
    response: dict[str, Any] = {"model_name": name, "model_version": model.version, "outputs": tensors}
    if request_id is not None:
        response["id"] = request_id
    return response, chunks
