"""The aiohttp application: OIP v2 routes, the hot-swap endpoint, /metrics and request capture."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kompressor import __version__
from kompressor.api import defaults as d
from kompressor.console import log
from kompressor.errors import UserError
from kompressor_jobs.capture import CaptureWriter
from kompressor_jobs.serve import feedback as fb
from kompressor_jobs.serve import jsonbody
from kompressor_jobs.serve import online as ol
from kompressor_jobs.serve.batching import DynamicBatcher
from kompressor_jobs.serve.metrics import InFlight, ServerMetrics
from kompressor_jobs.serve.model import LoadedModel
from kompressor_jobs.serve.oip import HEADER_LENGTH, BadRequest, InferRequest, decode_request, encode_response

# Requests up to this many input values run ORT on the event loop (a thread hop costs more than the
# run itself on small models); bigger ones run in the default executor so the loop keeps answering.
INLINE_ELEMENTS = 8192
# OIP v2 / Triton extension names: the repository API (load = hot swap) and binary tensors on REST
# and the online stage (a candidate beside the serving model: kompressor_jobs.serve.online)
EXTENSIONS = ["model_repository", "binary_tensor_data", ol.EXTENSION]
FEEDBACK_EXTENSION = "feedback"  # POST /v2/models/{name}/feedback, with --feedback (kompressor_jobs.serve.feedback)
REST, GRPC = "rest", "grpc"
CLIENT_GONE = 499  # the status nginx logs for a client that closed its connection first (never sent: no one hears it)


class NotFound(LookupError):
    """The request names a model or version this server does not serve."""


class InferenceFailed(RuntimeError):
    """ONNX Runtime failed on a valid request (HTTP 500, gRPC INTERNAL)."""


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class BodyRefused(Exception):
    """A REST request body not read: too slow (408) or too big (413). ``close``: the rest of it is not read, so the
    connection closes after the answer."""

    def __init__(self, status: int, message: str, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.close = status, message, close

    async def answer(self, request: web.Request) -> web.Response:
        response = _error(self.status, self.message)
        if self.close:  # answer, then close: aiohttp would otherwise read ("linger" over) the body for 10 s
            response.force_close()
            await response.prepare(request)
            await response.write_eof()
            request.protocol.force_close()
        return response


class InferenceServer:
    """Serves one model name; the model behind it can be swapped while requests are in flight."""

    def __init__(self, name: str, model: LoadedModel, capture: str | Path | None = None,
                 capture_max_bytes: int = 64 << 20, max_body_bytes: int = 8 << 20, capture_sink=None, peers=None,
                 max_batch_size: int = 0, max_batch_delay_ms: float = 0.0,
                 body_timeout_seconds: float = d.SERVING_BODY_TIMEOUT_SECONDS, feedback: bool = False,
                 feedback_window: int = d.SERVING_FEEDBACK_WINDOW,
                 feedback_max_requests: int = d.SERVING_FEEDBACK_MAX_REQUESTS, feedback_token: bytes | None = None,
                 task: str = d.MODEL_TASK, mirror_queue: int = d.SERVING_MIRROR_QUEUE):
        self.name = name
        self.model = model
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout_seconds
        self.metrics = ServerMetrics()
        self.batcher = None  # with --max-batch-size N > 1: concurrent requests merged into one ORT run
        if max_batch_size > 1:
            rows, requests = self.metrics.run_rows.labels(name), self.metrics.run_requests.labels(name)

            def observe(n_rows: int, n_requests: int) -> None:
                rows.observe(n_rows)
                requests.observe(n_requests)

            self.batcher = DynamicBatcher(self._run_alone, max_batch_size, max_batch_delay_ms / 1000, observe,
                                          in_server=lambda: self.in_flight.count)
        self.metrics.revision.labels(name).set(model.revision)
        self._swap_lock = asyncio.Lock()
        self.in_flight = InFlight(self.metrics.in_flight.labels(name))  # the gauge, and a count the batcher reads
        self.peers = peers  # with --workers: the swap coordinator (kompressor_jobs.serve.workers.Peers)
        self.capture = capture_sink  # with --workers: rows go to the supervisor, which writes them
        if capture and capture_sink is None:
            self.capture = CaptureWriter(
                capture, capture_max_bytes,
                on_drop=lambda rows, reason: self.metrics.capture_dropped.labels(name, reason).inc(rows),
                on_write=lambda rows: self.metrics.captured.labels(name).inc(rows))
            self.capture.start_serving(model.revision)  # a new serving stint unless it was serving already
        self.feedback = None  # with --feedback: recent predictions by id, online accuracy per revision
        self.feedback_token = feedback_token  # with --feedback-token-file: the bearer token labels need
        if feedback or feedback_token is not None:
            def exported(revision: int, window: fb.Window) -> None:
                self.metrics.online_accuracy.labels(name, str(revision)).set(window.accuracy)
                self.metrics.online_labels.labels(name, str(revision)).set(len(window.hits))

            self.feedback = fb.FeedbackStore(feedback_window, feedback_max_requests, on_accuracy=exported)
        self.online = ol.OnlineStage(name, self.metrics, task, mirror_queue)  # a candidate beside the model, if set
        self.metrics.online_candidate_revision.labels(name).set(-1)
        if self.feedback is not None:
            self.online.feedback = self.feedback
            self.feedback.on_label = self.online.labelled

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._errors_as_json])
        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            app.router.add_get(prefix, self.model_metadata)
            app.router.add_get(prefix + "/ready", self.model_ready)
            app.router.add_post(prefix + "/infer", self.infer)
        app.router.add_get("/v2", self.server_metadata)
        app.router.add_get("/v2/health/live", self.live)
        app.router.add_get("/v2/health/ready", self.ready)
        app.router.add_post("/v2/repository/index", self.repository_index)
        if self.feedback is not None:
            app.router.add_post("/v2/models/{name}/feedback", self.label)
            app.router.add_get("/v2/models/{name}/feedback/windows", self.label_windows)
        app.router.add_post("/v2/repository/models/{name}/load", self.load)
        app.router.add_post("/v2/repository/models/{name}/candidate", self.set_candidate)
        app.router.add_delete("/v2/repository/models/{name}/candidate", self.delete_candidate)
        app.router.add_get("/v2/models/{name}/online", self.online_evidence)
        app.router.add_get("/metrics", self.prometheus)
        app.on_cleanup.append(self._close_capture)
        app.on_cleanup.append(self._close_online)
        return app

    @web.middleware
    async def _errors_as_json(self, request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPException as err:
            if err.status < 400:
                raise
            return _error(err.status, err.reason if not err.text or err.text.startswith(str(err.status))
                          else err.text)

    async def _close_online(self, app) -> None:
        self.online.close()

    async def _close_capture(self, app) -> None:
        if self.capture:
            await asyncio.get_running_loop().run_in_executor(None, self.capture.close)

    # ---- what every protocol shares: lookup, the ORT run, capture and metrics -------------------------------

    def find(self, name: str, version: str | None) -> LoadedModel:
        """The model a request names (version None or "": the one serving), or NotFound."""
        model = self.model
        if name != self.name:
            raise NotFound(f"model {name!r} not found (this server serves {self.name!r})")
        if version and version != model.version:
            raise NotFound(f"model {name!r} has no version {version!r} (serving {model.version})")
        return model

    async def run(self, model: LoadedModel, request: InferRequest) -> list:
        """The model's outputs for a decoded request. BadRequest when ORT rejects the input (what the schema
        check could not see), InferenceFailed on any other ORT error. With dynamic batching the run may be shared
        with concurrent requests; the outputs are this request's rows all the same. With a candidate set, a canary
        request may run on it instead (kompressor_jobs.serve.online): served() and the answer then name it."""
        if self.online.candidate is not None:
            return await self.online.run(self, model, request)
        return await self.run_serving(model, request)

    async def run_serving(self, model: LoadedModel, request: InferRequest) -> list:
        """The serving model's run of a request: batched (--max-batch-size) or alone."""
        if self.batcher is not None:
            return await self.batcher.run(model, request)
        return await self._run_alone(model, request)

    async def _run_alone(self, model: LoadedModel, request: InferRequest) -> list:
        elements = sum(a.size for a in request.feeds.values())
        try:
            if elements <= INLINE_ELEMENTS:
                return model.run(request.feeds, request.outputs)
            return await asyncio.get_running_loop().run_in_executor(None, model.run, request.feeds, request.outputs)
        except Exception as err:  # onnxruntime raises its own exception types
            if type(err).__name__ in ("InvalidArgument", "Fail", "RuntimeException"):
                raise BadRequest(f"the model rejected the input: {err}") from None
            log("inference failed", level="error", error=repr(err))
            raise InferenceFailed(f"inference failed: {type(err).__name__}") from None

    def served(self, model: LoadedModel, request: InferRequest, names: list[str], results: list, started: float,
               protocol: str) -> None:
        """Capture and count one successful request; with a candidate set, hand it to the online stage."""
        routed = getattr(request, ol.ROUTED, None)  # set by run() on the requests to mirror, while a candidate is set
        if routed is not None:
            model = routed.model  # canary: maybe the candidate
        # inputs by name in their dtypes, and the outputs when all were computed (the serving revision's only)
        if self.capture is not None and (routed is None or not routed.by_candidate):
            captured = dict(zip(names, results)) if list(names) == list(model.output_names) else None
            self.capture.submit({spec.name: request.feeds[spec.name] for spec in model.inputs}, model.revision,
                                outputs=captured)
        seq = None
        if self.feedback is not None and request.request_id is not None and names and names[0] == model.output_names[0]:
            seq = self.feedback.remember(request.request_id, model.revision, results[0])
        if routed is not None:
            self.online.served(routed, request, names, results, seq)
        requests, batch, latency = self.metrics.for_revision(self.name, model.version, protocol)
        requests.inc()
        batch.observe(request.rows)
        latency.observe(time.perf_counter() - started)

    def failed(self, model: LoadedModel, protocol: str, code: str) -> None:
        self.metrics.errors.labels(self.name, model.version, protocol, code).inc()

    # ---- REST ----------------------------------------------------------------------------------------------

    def _find(self, request: web.Request) -> LoadedModel:
        """The model a URL names, or an HTTP 404."""
        try:
            return self.find(request.match_info["name"], request.match_info.get("version"))
        except NotFound as err:
            raise web.HTTPNotFound(text=str(err)) from None

    async def server_metadata(self, request: web.Request) -> web.Response:
        extensions = EXTENSIONS + ([FEEDBACK_EXTENSION] if self.feedback is not None else [])
        return web.json_response({"name": "kompressor", "version": __version__, "extensions": extensions})

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    async def model_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(self._find(request).metadata(self.name))

    async def model_ready(self, request: web.Request) -> web.Response:
        self._find(request)
        return web.json_response({"name": self.name, "ready": True})

    async def repository_index(self, request: web.Request) -> web.Response:
        return web.json_response([{"name": self.name, "version": self.model.version, "state": "READY"}])

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.exposition()),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def infer(self, request: web.Request) -> web.Response:
        with self.in_flight.track_inprogress():
            return await self._infer(request)

    async def _infer(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        model = self.model  # this request finishes on this model even if a swap happens meanwhile
        try:
            model = self._find(request)
            body, binary = _split_body(await self.read_body(request), request.headers.get(HEADER_LENGTH))
            try:
                header = jsonbody.loads(body)
            except (ValueError, UnicodeDecodeError) as err:
                raise BadRequest(f"request body is not valid JSON: {err}") from None
            decoded = decode_request(header, model, binary)
            if self.feedback is not None and decoded.request_id is None:  # labels need an id: one is assigned
                decoded.request_id = uuid.uuid4().hex
            results = await self.run(model, decoded)
        except BodyRefused as err:
            self.failed(model, REST, str(err.status))
            return await err.answer(request)
        except BadRequest as err:
            return self._failed(model, 400, str(err))
        except InferenceFailed as err:
            return self._failed(model, 500, str(err))
        except web.HTTPException as err:
            self.failed(model, REST, str(err.status))
            raise
        routed = getattr(decoded, ol.ROUTED, None)
        if routed is not None:
            model = routed.model  # canary: the candidate may have answered
        names = decoded.outputs or model.output_names
        response, chunks = encode_response(self.name, model, names, results, decoded.request_id,
                                           decoded.binary_outputs)
        self.served(model, decoded, names, results, started, REST)
        if not chunks:
            return web.Response(body=jsonbody.dumps(response), content_type="application/json", charset="utf-8")
        head = jsonbody.dumps(response)
        return web.Response(body=b"".join([head, *chunks]), content_type="application/octet-stream",
                            headers={HEADER_LENGTH: str(len(head))})

    async def read_body(self, request: web.Request) -> bytes:
        """The request's body, read within the body timeout and the size limit, or BodyRefused: 408 when it comes
        too slowly; 413 when it is over the limit: a body up to SERVING_BODY_DISCARD_FACTOR times the limit is
        read and thrown away (the connection stays usable), a longer one (or a Content-Length that says so) is
        refused at once and its connection closed, unread."""
        limit = self.max_body_bytes
        discard = limit * d.SERVING_BODY_DISCARD_FACTOR
        too_big = f"request body is over the limit of {limit} bytes (--max-body-bytes)"
        length = request.content_length
        if length is not None and length > discard:
            raise BodyRefused(413, f"request body of {length} bytes is over the limit of {limit} bytes "
                              f"(--max-body-bytes)", close=True)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout):
                while chunk := await request.content.readany():
                    size += len(chunk)
                    if size <= limit:
                        chunks.append(chunk)
                    elif size > discard:
                        raise BodyRefused(413, too_big, close=True)
                    else:
                        chunks.clear()
        except TimeoutError:
            raise BodyRefused(408, f"request body not received within {self.body_timeout:g} s "
                              f"(--body-timeout-seconds)", close=True) from None
        except ConnectionError:  # the client went away before its body was in: counted, nobody to answer
            raise BodyRefused(CLIENT_GONE, "the client closed the connection before sending the whole body") from None
        if size > limit:
            raise BodyRefused(413, too_big)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def label(self, request: web.Request) -> web.Response:
        """``POST /v2/models/{name}/feedback``: one label ``{"id", "label"}`` or a list of them. A single label's
        refusal is its 4xx (STATUS in kompressor_jobs.serve.feedback). A list is judged label by label: the valid
        ones are accepted (labels come from independent sources: one stale id must not hold back the others, and
        a client resending the list after a partial failure gets ``duplicate`` for those already in); the answer
        says what happened to each, and is 200 when any was accepted, else the 4xx they share (400 if they
        differ)."""
        refused = self.metrics.feedback_refused
        if not fb.authorized(request.headers.get("Authorization"), self.feedback_token):
            refused.labels(self.name, fb.UNAUTHORIZED).inc()
            return web.json_response({"error": "a valid bearer token is required (Authorization: Bearer <token>)"},
                                     status=401, headers={"WWW-Authenticate": "Bearer"})
        self._find(request)
        try:
            body = json.loads(await self.read_body(request))
        except BodyRefused as err:
            refused.labels(self.name, fb.MALFORMED).inc()
            return await err.answer(request)
        except (ValueError, UnicodeDecodeError) as err:
            refused.labels(self.name, fb.MALFORMED).inc()
            return _error(400, f"request body is not valid JSON: {err}")
        if isinstance(body, list) and not body or not isinstance(body, (list, dict)):
            refused.labels(self.name, fb.MALFORMED).inc()
            return _error(400, 'the body must be a label {"id": "<request id>", "label": <class>} or a non-empty '
                          'list of them')
        outcomes = [self.feedback.label(item) for item in (body if isinstance(body, list) else [body])]
        for outcome in outcomes:
            if outcome.status == fb.ACCEPTED:
                self.metrics.feedback_accepted.labels(self.name, str(outcome.revision)).inc()
            else:
                refused.labels(self.name, outcome.status).inc()
        accepted = sum(o.status == fb.ACCEPTED for o in outcomes)
        statuses = {fb.STATUS[o.status] for o in outcomes if o.status != fb.ACCEPTED}
        status = 200 if accepted else (statuses.pop() if len(statuses) == 1 else 400)
        if isinstance(body, dict):
            answer = outcomes[0].as_json()
            if status != 200:
                answer["error"] = outcomes[0].message
            return web.json_response(answer, status=status)
        return web.json_response({"accepted": accepted, "refused": len(outcomes) - accepted,
                                  "results": [o.as_json() for o in outcomes]}, status=status)

    async def label_windows(self, request: web.Request) -> web.Response:
        """``GET /v2/models/{name}/feedback/windows``: each revision's labelled rows in disjoint windows (what the
        drift watcher judges; ``instance`` tells a restarted process, whose windows start over, from this one)."""
        self._find(request)
        return web.json_response({"instance": ol.INSTANCE, **self.feedback.windows_json()})

    async def _json_body(self, request: web.Request):
        """The request's body as JSON, or the answer refusing it (a BodyRefused's, or 400 for bad JSON)."""
        try:
            return json.loads(await self.read_body(request))
        except BodyRefused as err:
            return await err.answer(request)
        except (ValueError, UnicodeDecodeError) as err:
            return _error(400, f"request body is not valid JSON: {err}")

    def _failed(self, model: LoadedModel, status: int, message: str) -> web.Response:
        self.failed(model, REST, str(status))
        return _error(status, message)

    async def load(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name != self.name:
            raise web.HTTPNotFound(text=f"model {name!r} not found (this server serves {self.name!r})")
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            return body
        params = body.get("parameters") if isinstance(body, dict) else None
        given = _artifact_parameters(params if isinstance(params, dict) else {}, "the artifact folder")
        if isinstance(given, web.Response):
            return given
        folder, sha256 = given
        if self.peers is not None:  # several worker processes: every one of them swaps, or none
            try:
                new = await self.peers.swap(folder, sha256)
            except UserError as err:
                self.metrics.swaps.labels(self.name, "failed").inc()
                log("hot swap refused", level="warning", artifact=str(folder), error=str(err))
                return _error(400, str(err))
            self.metrics.swaps.labels(self.name, "loaded").inc()
            return web.json_response({"name": self.name, "version": new["version"], "sha256": new["sha256"]})
        async with self._swap_lock:
            try:
                new = await load_model(folder, sha256)
            except UserError as err:
                self.metrics.swaps.labels(self.name, "failed").inc()
                log("hot swap refused", level="warning", artifact=str(folder), error=str(err))
                return _error(400, str(err))
            if self.capture is not None:  # before any request on the new model: rows served since count
                self.capture.start_serving(new.revision)
            self.switch(new)
            self.online.promoted(new)  # the candidate's revision serving now: no candidate any more
            self.metrics.swaps.labels(self.name, "loaded").inc()
        return web.json_response({"name": self.name, "version": new.version, "sha256": new.sha256})

    async def set_candidate(self, request: web.Request) -> web.Response:
        """``POST /v2/repository/models/{name}/candidate``: set (or replace, or re-weigh) the candidate. 400 with
        the old state kept on any problem."""
        self._find(request)
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            return body
        params = body.get("parameters") if isinstance(body, dict) else None
        if not isinstance(params, dict):
            return _error(400, 'the body must be {"parameters": {"artifact": ..., "mode": ..., "weight": ...}}')
        given = _artifact_parameters(params, "the candidate's artifact folder")
        if isinstance(given, web.Response):
            return given
        folder, sha256 = given
        if self.peers is not None:
            return _error(400, "a candidate needs one server process (--workers 1)")
        try:
            mode, weight = ol.check_settings(params.get("mode", d.SERVING_CANDIDATE_MODE),
                                             params.get("weight", d.SERVING_CANDIDATE_WEIGHT))
        except UserError as err:
            return _error(400, str(err))
        async with self._swap_lock:
            if sha256 and self.online.same(mode, sha256, artifact=folder):  # only the weight changes: no reload
                return web.json_response({"candidate": self.online.reweigh(weight).evidence()})
            try:
                new = await load_model(folder, sha256)
                ol.check_compatible(new, self.model)
            except UserError as err:
                log("candidate refused", level="warning", artifact=str(folder), error=str(err))
                return _error(400, str(err))
            return web.json_response({"candidate": self.online.set(new, mode, weight).evidence()})

    async def delete_candidate(self, request: web.Request) -> web.Response:
        """``DELETE /v2/repository/models/{name}/candidate``: no candidate any more."""
        self._find(request)
        self.online.clear("deleted")
        return web.json_response({"candidate": None})

    async def online_evidence(self, request: web.Request) -> web.Response:
        """``GET /v2/models/{name}/online``: the candidate's counts since it was set (kompressor_jobs.serve.online)."""
        self._find(request)
        return web.json_response(self.online.evidence(self.model))

    def switch(self, new: LoadedModel) -> None:
        """Serve ``new`` from now on (one assignment: requests already running finish on the old model)."""
        old, self.model = self.model, new
        self.metrics.revision.labels(self.name).set(new.revision)
        log("model swapped", model=self.name, old_revision=old.revision, revision=new.revision, sha256=new.sha256)


async def load_model(folder: Path, sha256: str | None) -> LoadedModel:
    """A verified, loaded and warmed-up model, built off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, _load_and_warm, folder, sha256)


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview | None]:
    """(the JSON part, the binary data after it) of a REST request: the binary tensor extension puts the JSON's
    length in the Inference-Header-Content-Length header and the tensors' bytes after it."""
    if header_length is None:
        return body, None
    try:
        length = int(header_length)
    except ValueError:
        length = -1
    if not 0 <= length <= len(body):
        raise BadRequest(f"{HEADER_LENGTH} must be an integer between 0 and the body's length ({len(body)}), "
                         f"got {header_length!r}")
    return body[:length], memoryview(body)[length:]


def _load_and_warm(folder: Path, sha256: str | None) -> LoadedModel:
    model = LoadedModel(folder, sha256)
    model.warm_up()
    return model


def _artifact_parameters(params: dict, folder_is: str) -> tuple[Path, str | None] | web.Response:
    """(artifact folder, expected sha256) from a load or candidate body's ``parameters``, or the 400 refusing them."""
    artifact, sha256 = params.get("artifact"), params.get("sha256")
    if not isinstance(artifact, str) or not artifact:
        return _error(400, f"parameters.artifact ({folder_is}) is required")
    if sha256 is not None and not isinstance(sha256, str):
        return _error(400, "parameters.sha256 must be a string")
    folder = _artifact_path(artifact)
    if folder is None:
        return _error(400, f"parameters.artifact must be an absolute path or a file:// URI, got {artifact!r}")
    return folder, sha256


def _artifact_path(artifact: str) -> Path | None:
    if artifact.startswith(("file://", "pvc://")):
        from kompressor.store import StoreError, resolve_local

        try:
            return resolve_local(artifact)
        except StoreError:
            return None
    path = Path(artifact)
    return path if path.is_absolute() and ".." not in path.parts else None
