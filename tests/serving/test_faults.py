"""`kompressor serve` under faults and load, on loopback, each test bounded to seconds: clients that disconnect
mid-request (REST and gRPC), slow bodies and slow headers (slowloris) that time out, a body at 10x the limit refused
without being read, and a short soak at a fixed rate with hot swaps: no failed request, flat RSS. Through all of
them the server stays up, and the capture keeps every row it counted as kept."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import numpy as np
import pytest

from kompressor_jobs import capture
from serving_support import N_FEATURES, Server, http, infer_body, metric_value, ort_run
from support.polling import wait

pytestmark = pytest.mark.slow
BODY_TIMEOUT = 1.0
HEADER_TIMEOUT = 1.5
LIMIT = 1 << 20  # --max-body-bytes


@pytest.fixture
def server(artifacts, tmp_path):
    srv = Server(artifacts[1], "mlp", capture=tmp_path / "capture", log=tmp_path / "server.log", grpc=True,
                 extra=["--body-timeout-seconds", str(BODY_TIMEOUT), "--header-timeout-seconds", str(HEADER_TIMEOUT),
                        "--max-body-bytes", str(LIMIT)])
    srv.capture = tmp_path / "capture"
    yield srv
    srv.stop()


def request_head(server: Server, length: int | None, extra: str = "") -> bytes:
    sized = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return (f"POST /v2/models/{server.name}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"{sized}{extra}\r\n").encode()


def read_answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or a reset after its answer)."""
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except ConnectionResetError:
        pass
    return answer


def still_serving(server: Server, artifact) -> None:
    x = np.random.default_rng(1).normal(size=(2, N_FEATURES)).astype(np.float32)
    status, out = http("POST", server.infer_url(), infer_body(x))
    assert status == 200, out
    np.testing.assert_array_equal(np.asarray(out["outputs"][0]["data"], np.float32).reshape(2, 3),
                                  ort_run(artifact, x))


def capture_is_whole(server: Server) -> int:
    """Wait until the rows counted as kept are all on disk and are every row served; that count."""
    def settled():
        text = server.metrics()
        served = metric_value(text, "kompressor_inference_batch_size_sum", model=server.name)
        kept = metric_value(text, "kompressor_capture_rows_total", model=server.name)
        dropped = metric_value(text, "kompressor_capture_dropped_rows_total", model=server.name)
        rows, _ = capture.read_since(server.capture, capture.Position())
        on_disk = 0 if rows is None else len(rows)
        return served if served == kept == on_disk and dropped == 0 else None

    return wait(settled, 20, "every served row in the capture", lambda: server.metrics()[-3000:], interval=0.05)


def in_flight(server: Server) -> float:
    return metric_value(server.metrics(), "kompressor_inference_requests_in_flight", model=server.name)


def test_clients_that_disconnect_mid_request_leave_the_server_serving(server, artifacts):
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    x = np.ones((4, N_FEATURES), np.float32)
    body = json.dumps(infer_body(x)).encode()
    for i in range(10):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            if i % 2:  # gone in the middle of the body
                sock.sendall(request_head(server, len(body)) + body[: len(body) // 2])
            else:  # gone after the whole request, before reading the answer
                sock.sendall(request_head(server, len(body)) + body)
    channel = grpc.insecure_channel(server.grpc_target)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = pb.ModelInferRequest(model_name="mlp", raw_input_contents=[x.tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    for _ in range(5):  # gRPC clients that give up at once: the calls are cancelled (or were already answered)
        stub.ModelInfer.future(request).cancel()
    assert stub.ModelInfer(request, timeout=30).model_version == "1"
    channel.close()
    wait(lambda: in_flight(server) == 0, 20, "no request in flight")
    still_serving(server, artifacts[1])
    served = capture_is_whole(server)
    # the five complete REST requests were answered into the void: served, counted and kept like any other; then
    # the gRPC call that waited for its answer, and the last request
    assert served >= 5 * 4 + 4 + 2, served
    # the five that left mid-body are counted as errors with nginx's 499 (client closed request), quietly
    assert metric_value(server.metrics(), "kompressor_inference_errors_total", model="mlp", code="499") == 5
    assert "Traceback" not in server.log.read_text()
    assert http("GET", f"{server.url}/v2/health/live")[0] == 200


def test_slow_bodies_get_a_408_and_slow_headers_a_closed_connection_while_others_are_served(server, artifacts):
    body = json.dumps(infer_body(np.ones((1, N_FEATURES), np.float32))).encode()
    slow_bodies = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(8)]
    slow_heads = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(8)]
    started = time.monotonic()
    for sock in slow_bodies:
        sock.sendall(request_head(server, len(body)) + body[:5])
    head = request_head(server, len(body))
    for sock in slow_heads:
        sock.sendall(head[:20])
    # trickle one more byte each, while ordinary requests are answered meanwhile
    for i in range(6):
        for sock in slow_bodies:
            try:
                sock.send(body[5 + i: 6 + i])
            except OSError:
                pass
        for sock in slow_heads:
            try:
                sock.send(head[20 + i: 21 + i])
            except OSError:
                pass
        still_serving(server, artifacts[1])
        time.sleep(0.1)  # the slow client's pace, not a wait for a condition
    for sock in slow_bodies:
        answer = read_answer(sock)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"--body-timeout-seconds" in answer
        sock.close()
    for sock in slow_heads:
        assert read_answer(sock) == b""  # closed without an answer: the head never came
        sock.close()
    elapsed = time.monotonic() - started
    assert elapsed < BODY_TIMEOUT + HEADER_TIMEOUT + 10, elapsed
    text = server.metrics()
    assert metric_value(text, "kompressor_inference_errors_total", model="mlp", code="408") == len(slow_bodies)
    wait(lambda: in_flight(server) == 0, 20, "no request in flight")
    capture_is_whole(server)
    assert "Traceback" not in server.log.read_text()


def _push(sock: socket.socket, total: int) -> int:
    """Send up to ``total`` bytes until the server stops taking them; how many it took."""
    sock.settimeout(2)
    chunk, sent = b" " * 65536, 0
    try:
        while sent < total:
            sent += sock.send(chunk[: total - sent])
    except (OSError, socket.timeout):
        pass
    return sent


def test_a_body_ten_times_the_limit_is_refused_without_being_read(server, artifacts):
    total = 10 * LIMIT
    # Content-Length says so: 413 at once, before the body
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request_head(server, total) + b" " * 65536)
        answer = read_answer(sock)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"--max-body-bytes" in answer
    # pushing the whole body anyway: the server takes no more than what sits in the sockets' buffers
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request_head(server, total))
        assert _push(sock, total) < total // 2
    # no Content-Length (chunked): read up to twice the limit, then 413 and closed
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request_head(server, None))
        size = 1 << 16
        frame = f"{size:x}\r\n".encode() + b" " * size + b"\r\n"
        sent = 0
        sock.settimeout(2)
        try:
            while sent < total:
                sock.sendall(frame)
                sent += size
        except (OSError, socket.timeout):
            pass
        assert sent < total  # it stopped taking the body: twice the limit read, the rest stuck in socket buffers
        answer = read_answer(sock)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # a body just over the limit: a 413 the client reads, on a connection that stays usable
    status, out = http("POST", server.infer_url(), raw=b" " * (LIMIT + 10))
    assert status == 413 and "--max-body-bytes" in out["error"]
    still_serving(server, artifacts[1])
    assert metric_value(server.metrics(), "kompressor_inference_errors_total", model="mlp", code="413") >= 3
    capture_is_whole(server)
    assert "Traceback" not in server.log.read_text()


def rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


RATE = 40  # requests per second
SOAK_SECONDS = 12
RSS_TOLERANCE = 8 << 20  # RSS growth allowed from the end of the warm-up to the end


@pytest.fixture
def steady_server(artifacts, tmp_path):
    """A server with the default timeouts: the 1.5 s header timeout above is also the idle keep-alive timeout, and
    a client reusing a pooled connection just as the server closes it would fail its request (as with any server's
    idle timeout; clients keep their pool's idle timeout below the server's)."""
    srv = Server(artifacts[1], "mlp", capture=tmp_path / "capture", log=tmp_path / "server.log")
    srv.capture = tmp_path / "capture"
    yield srv
    srv.stop()


def test_a_short_soak_with_hot_swaps_fails_no_request_and_keeps_rss_flat(steady_server, artifacts):
    import aiohttp

    server = steady_server

    x = np.random.default_rng(2).normal(size=(4, N_FEATURES)).astype(np.float32)
    expected = {str(r): ort_run(artifacts[r], x) for r in (1, 2)}
    sha = {r: json.loads((artifacts[r] / "manifest.json").read_text())["files"]["model.onnx"] for r in (1, 2)}
    payload = json.dumps(infer_body(x)).encode()

    async def soak():
        results, rss = [], {}
        async with aiohttp.ClientSession() as client:
            async def one():
                async with client.post(server.infer_url(), data=payload,
                                       headers={"Content-Type": "application/json"}) as response:
                    results.append((response.status, await response.json()))

            async def swap(revision: int):
                body = {"parameters": {"artifact": str(artifacts[revision]), "sha256": sha[revision]}}
                async with client.post(f"{server.url}/v2/repository/models/mlp/load", json=body) as response:
                    return response.status

            loop = asyncio.get_running_loop()
            start, tasks, swaps = loop.time(), [], []
            plan = {SOAK_SECONDS // 4: 2, SOAK_SECONDS // 2: 1, 3 * SOAK_SECONDS // 4: 2}  # second -> revision
            for i in range(RATE * SOAK_SECONDS):  # open loop: request i goes out at i / RATE
                await asyncio.sleep(max(0.0, start + i / RATE - loop.time()))
                tasks.append(asyncio.create_task(one()))
                if i == 2 * RATE:
                    rss["start"] = rss_bytes(server.process.pid)
                if i % RATE == 0 and i // RATE in plan:
                    swaps.append(asyncio.create_task(swap(plan[i // RATE])))
            await asyncio.gather(*tasks)
            swapped = await asyncio.gather(*swaps)
            rss["end"] = rss_bytes(server.process.pid)
        return results, swapped, rss

    results, swapped, rss = asyncio.run(soak())
    assert swapped == [200, 200, 200]
    assert len(results) == RATE * SOAK_SECONDS
    assert not [r for r in results if r[0] != 200], [r for r in results if r[0] != 200][:3]
    assert {b["model_version"] for _, b in results} == {"1", "2"}
    for _, b in results:
        np.testing.assert_array_equal(np.asarray(b["outputs"][0]["data"], np.float32).reshape(4, 3),
                                      expected[b["model_version"]])
    growth = rss["end"] - rss["start"]
    print(f"soak: {len(results)} requests, RSS {rss['start'] / 2**20:.1f} -> {rss['end'] / 2**20:.1f} MiB")
    assert growth < RSS_TOLERANCE, rss
    assert capture_is_whole(server) == 4 * len(results)
    assert "Traceback" not in server.log.read_text()
