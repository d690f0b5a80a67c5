"""Open Inference Protocol v2 request decoding and response encoding (JSON, no binary extension).

Decoding is strict: every problem raises ``BadRequest`` with a message naming the tensor and
what is wrong, so the server answers 400 and never captures or runs a malformed request.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from kompressor_jobs.serve.model import NUMPY_TO_OIP, OIP_TO_NUMPY, LoadedModel, TensorSpec

OIP_DATATYPES = (*OIP_TO_NUMPY, "BYTES")
_FLOAT = ("FP16", "FP32", "FP64")


class BadRequest(ValueError):
    """The request is malformed; the message goes back to the client with HTTP 400."""


def decode_request(body: Any, model: LoadedModel) -> tuple[dict[str, np.ndarray], list[str] | None, Any]:
    """(feeds for ORT, requested output names or None for all, request id or None)."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    specs = {s.name: s for s in model.inputs}
    feeds: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise BadRequest(f"inputs[{i}] must be an object")
        name = tensor.get("name")
        if not isinstance(name, str):
            raise BadRequest(f"inputs[{i}].name must be a string")
        if name not in specs:
            raise BadRequest(f"input {name!r} is not an input of the model (inputs: {', '.join(specs)})")
        if name in feeds:
            raise BadRequest(f"input {name!r} is given twice")
        feeds[name] = decode_tensor(tensor, specs[name])
    missing = [n for n in specs if n not in feeds]
    if missing:
        raise BadRequest(f"missing input(s): {', '.join(missing)}")
    batches = {a.shape[0] for a in feeds.values() if a.ndim}
    if len(batches) > 1:
        raise BadRequest(f"inputs disagree on the batch size: {sorted(batches)}")
    outputs = _requested_outputs(body.get("outputs"), model)
    return feeds, outputs, request_id


def decode_tensor(tensor: dict, spec: TensorSpec) -> np.ndarray:
    name = spec.name
    datatype = tensor.get("datatype")
    if datatype not in OIP_DATATYPES:
        raise BadRequest(f"input {name!r}: unknown datatype {datatype!r} (OIP v2: {', '.join(OIP_DATATYPES)})")
    if datatype == "BYTES" or spec.datatype not in OIP_TO_NUMPY:
        raise BadRequest(f"input {name!r}: datatype {datatype} is not accepted; the model takes {spec.datatype}")
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise BadRequest(f"input {name!r}: 'shape' must be a non-empty list of positive integers")
    if len(shape) != len(spec.shape) or any(m not in (-1, d) for m, d in zip(spec.shape, shape)):
        raise BadRequest(f"input {name!r}: shape {shape} does not fit the model's {list(spec.shape)}")
    if "data" not in tensor:
        raise BadRequest(f"input {name!r}: 'data' is missing")
    params = tensor.get("parameters") or {}
    if isinstance(params, dict) and params.get("binary_data_size") is not None:
        raise BadRequest(f"input {name!r}: the binary tensor extension is not supported; send JSON 'data'")
    values = _to_array(tensor["data"], name)
    expected = math.prod(shape)
    if values.ndim > 1 and list(values.shape) != shape:
        raise BadRequest(f"input {name!r}: nested data has shape {list(values.shape)}, but 'shape' says {shape}")
    if values.size != expected:
        raise BadRequest(f"input {name!r}: {values.size} values given, shape {shape} needs {expected}")
    array = _as_datatype(values, datatype, name).reshape(shape)
    return _to_model_type(array, datatype, spec)


def _to_array(data: Any, name: str) -> np.ndarray:
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
    """The JSON values as the declared datatype, refusing anything the declaration does not allow."""
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
        return values.astype(dtype)
    if kind == "f":
        raise BadRequest(f"input {name!r}: non-integer values given for datatype {datatype}")
    info = np.iinfo(dtype)
    if values.size and (values.min() < info.min or values.max() > info.max):
        raise BadRequest(f"input {name!r}: values outside the range of {datatype}")
    return values.astype(dtype)


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


def _requested_outputs(outputs: Any, model: LoadedModel) -> list[str] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                for o in outputs):
        raise BadRequest("'outputs' must be a list of objects with a 'name'")
    names = [o["name"] for o in outputs]
    unknown = [n for n in names if n not in model.output_names]
    if unknown:
        raise BadRequest(f"unknown output(s): {', '.join(unknown)} (outputs: {', '.join(model.output_names)})")
    return names


def encode_response(name: str, model: LoadedModel, output_names: list[str], results: list[np.ndarray],
                    request_id: Any) -> dict:
    response: dict[str, Any] = {"model_name": name, "model_version": model.version, "outputs": [
        {"name": n, "datatype": NUMPY_TO_OIP.get(r.dtype, "BYTES"), "shape": list(r.shape),
         "data": r.reshape(-1).tolist()}
        for n, r in zip(output_names, results)
    ]}
    if request_id is not None:
        response["id"] = request_id
    return response
