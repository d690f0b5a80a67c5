"""The REST JSON path parses and encodes with orjson when it is installed (kompressor_jobs.serve.jsonbody), with
the answers and the errors the standard library gives: every body parses to what ``json.loads`` makes of it or
fails with its exception and message, every value encodes to what ``json.dumps`` writes (as JSON values), and the
server's answers to a malformed body name ``json``'s own error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kompressor_jobs.serve import jsonbody
from serving_support import N_FEATURES, http, infer_body, ort_run

BODIES = [
    b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2], "data": [0.1, -2.5e-3]}]}',
    b'{"a": 1, "a": 2}',  # a duplicate key: the last one wins
    b'{"x": NaN, "y": Infinity, "z": -Infinity}',  # not JSON, but json.loads reads it (the checks refuse it later)
    b'{"big": 123456789012345678901234567890, "u64": 18446744073709551615, "tiny": 1e-400, "huge": 1e400}',
    '{"t": "caf\u00e9 \u2603"}'.encode(),
    '{"utf16": [1, 2]}'.encode("utf-16"),  # json.loads detects UTF-16 and UTF-32
    b"  [1, 2.0, true, false, null]\n",
    # malformed: each must fail with json.loads's own exception and message
    b"", b"{", b'{"inputs": [}', b"[1, 2,]", b'{"a": 1} trailing', b"\xff\xfe\xfa", b'{"s": "\xed\xa0\x80"}',
    b'{"s": "\\ud800"}', b"nan", b"01",
]


def outcome(parse, body: bytes):
    try:
        return "ok", parse(body)
    except (ValueError, UnicodeDecodeError) as err:
        return type(err), str(err)


@pytest.mark.parametrize("body", BODIES)
def test_every_body_parses_as_the_standard_library_parses_it_or_fails_with_its_message(body):
    got, expected = outcome(jsonbody.loads, body), outcome(json.loads, body)
    assert repr(got) == repr(expected)  # repr: NaN == NaN, and 1 is not True


@pytest.mark.parametrize("value", [
    {"model_name": "m", "model_version": "3", "outputs": [{"name": "y", "datatype": "FP32", "shape": [2],
                                                           "data": [0.10000000149011612, -3.4e38]}], "id": "é"},
    {"data": [1.0, float("nan"), 2.0]}, {"data": [float("inf")]}, {"data": [1e308, 1e308]},  # written as json does
    {"ints": [2 ** 63, -(2 ** 63), True, None]}, {"big": 2 ** 70}, [], {},
])
def test_every_value_encodes_to_what_the_standard_library_writes(value):
    written = jsonbody.dumps(value)
    assert isinstance(written, bytes)
    assert repr(json.loads(written)) == repr(json.loads(json.dumps(value)))
    if "nan" in repr(value) or "inf" in repr(value):
        assert written == json.dumps(value).encode()  # NaN and Infinity as json writes them, not null


def test_orjson_is_what_the_jobs_extra_installs():
    pytest.importorskip("orjson")
    assert jsonbody.orjson is not None


def test_the_server_answers_as_before_and_names_json_s_own_error(server, artifacts):
    x = np.random.default_rng(7).normal(size=(32, N_FEATURES)).astype(np.float32)
    status, out = http("POST", server.infer_url(), infer_body(x, request_id="r-1"))
    assert status == 200, out
    assert out["id"] == "r-1" and out["model_version"] == "1"
    np.testing.assert_array_equal(np.asarray(out["outputs"][0]["data"], np.float32).reshape(32, -1),
                                  ort_run(artifacts[1], x))
    for raw in (b'{"inputs": [}', b"", b'{"inputs": []} x', b"\xff\xfe\xfa"):
        status, out = http("POST", server.infer_url(), raw=raw)
        assert status == 400, (raw, out)
        assert out == {"error": f"request body is not valid JSON: {outcome(json.loads, raw)[1]}"}, raw
    status, out = http("POST", server.infer_url(), raw=b'{"inputs": [{"name": "input", "datatype": "FP32", '
                                                      b'"shape": [1, %d], "data": [NaN%s]}]}'
                                                      % (N_FEATURES, b", 0" * (N_FEATURES - 1)))
    assert status == 400 and "NaN or infinite" in out["error"], out  # read by json as before, then refused
