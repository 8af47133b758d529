"""`ptune serve run=<dir>[,<dir>...]`: many adapters on one frozen backbone over HTTP, rows of different
clients batched together.

    GET  /health          {"status": "ok", "adapters": K}
    GET  /adapters        {"adapters": [{name, method, task, head, prompt_length, labels?, fields, run}, ...]}
    POST /predict         {"inputs": [{"adapter": "sst2", "sentence": "..."}, ...]}
                       -> {"outputs": [{"adapter": "sst2", "prediction": "positive"}, ...]}   (input order)
    GET  /v1/models       OpenAI-compatible: the adapters as models (ptune/infer/openai_api.py)
    POST /v1/completions  OpenAI-compatible completions, `model` names the adapter; `stream: true` streams
    GET  /metrics         Prometheus text format (ptune/infer/serve_metrics.py)

Batching (ptune/infer/batcher.py): every request's rows go to one model thread, which runs rows of
different requests together: classification rows in mixed forwards of up to `max_batch_rows` rows
(waiting at most `max_wait_ms` for a batch to fill), generation rows in one continuously batched decoding
loop (ptune/infer/continuous.py: rows join and leave at token boundaries). Rows are taken round-robin over
the queued requests, oldest first, one row per request per turn.

The HTTP stack is uvicorn (h11) with Starlette (docs/design.md says why). What it keeps of the hand-written
server it replaces: every client mistake is a JSON body {"error": "<one line>"} with a 4xx status, and the
server goes on serving: a body that is not JSON, or JSON the decoder refuses (nesting too deep, an integer
of thousands of digits), or no "inputs" list (400), empty inputs (400), unknown adapter or a missing,
non-text or empty field (400, the Pool's own message), more rows than `max_batch` or a field longer than
`max_input_chars` or a body past their product (413, refused before it is read), no Content-Length (411),
an unknown path (404), a method no endpoint takes (405), and what the HTTP parser itself refuses (a garbage
request line 400, no Host header on HTTP/1.1 400, a URL past 16 KiB 414, headers past 64 KiB or more than
100 of them 431, an HTTP version other than 1.x 400): all JSON, never the parser's plain text (the `_Protocol` below answers for h11). /v1/ paths
answer errors in OpenAI's shape {"error": {"message", "type", ...}}. A connection that has not sent a
whole request line and headers within `timeout` seconds of opening (or of its last answer) is closed; a
body that stops arriving is answered 408 after `timeout` seconds. At most `max_connections` connections
are open at once; one more is answered 503 (JSON, Retry-After: 1) and closed. An unexpected exception in
the model call is a 500 with its one line (and the traceback in the server's log). SIGTERM or Ctrl-C
stops accepting, lets the requests in flight finish and answer (up to `timeout` + 5 s), then exits 0.
Localhost by default: the server has no authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
import traceback
from http import HTTPStatus

import h11
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.supervisors import Multiprocess

from ptune.build import load_run
from ptune.errors import PtuneError
from ptune.infer import openai_api
from ptune.infer.batcher import Job, Scheduler
from ptune.infer.bodies import Refused, parse_inputs
from ptune.infer.pool import ADAPTER_FIELD, Pool, parse_runs
from ptune.infer.serve_metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("ptune.serve")

DEFAULTS = {"host": "127.0.0.1", "port": 8000, "max_batch": 64, "max_input_chars": 4000, "max_batch_rows": 32,
            "max_wait_ms": 5, "max_connections": 256, "timeout": 10, "max_tokens": 256, "workers": 1}
REPLICA_ENV = "PTUNE_SERVE_REPLICA"  # a replica process's settings (workers > 1), JSON
PID = str(os.getpid()).encode()  # which replica answered (header x-ptune-replica), set again in each replica
MAX_HEADERS = 100  # as http.client / http.server count them
MAX_URL = 16_384  # bytes of the request target
MAX_HEAD = 65_536  # bytes of all header lines
ENDPOINTS = {"/health": "GET", "/adapters": "GET", "/predict": "POST", "/metrics": "GET", "/v1/models": "GET",
             "/v1/completions": "POST"}


class Service:
    """What the endpoints share: the pool, its scheduler, the limits and the metrics."""

    def __init__(self, pool: Pool, max_batch: int, max_input_chars: int, max_batch_rows: int, max_wait_ms: float,
                 timeout: float, max_tokens: int):
        self.pool = pool
        self.max_batch, self.max_input_chars, self.timeout, self.max_tokens = max_batch, max_input_chars, timeout, max_tokens
        self.max_body = max_batch * (max_input_chars + 1024)  # every row at its largest, with room for field names
        self.metrics = Metrics()
        self.scheduler = Scheduler(pool, max_batch_rows, max_wait_ms, self.metrics)

    async def body(self, request: Request) -> bytes:
        """The whole body within `timeout` seconds and `max_body` bytes, or Refused (411, 413, 408)."""
        length = request.headers.get("content-length")
        chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
        if not chunked and (length is None or not length.isdigit()):
            raise Refused(HTTPStatus.LENGTH_REQUIRED, f"POST {request.url.path} needs a Content-Length header")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                          f"the body has {length} bytes, more than this server's limit of {self.max_body}", close=True)

        async def read() -> bytes:
            data = bytearray()
            async for chunk in request.stream():
                data += chunk
                if len(data) > self.max_body:
                    raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                  f"the body has more than this server's limit of {self.max_body} bytes", close=True)
            return bytes(data)

        try:
            return await asyncio.wait_for(read(), self.timeout)
        except TimeoutError:
            raise Refused(HTTPStatus.REQUEST_TIMEOUT, f"the request body did not arrive within {self.timeout} s",
                          close=True) from None

    async def run(self, rows: list[dict], on_text=None, max_tokens=None, stop=()) -> list:
        """The rows' Results through the scheduler (a cancelled await cancels the job)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def settle(results, error):
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(results)

        job = Job(rows, lambda results, error: loop.call_soon_threadsafe(settle, results, error), on_text=on_text,
                  max_tokens=max_tokens, stop=tuple(stop))
        self.scheduler.submit(job)
        try:
            return await future
        except asyncio.CancelledError:
            job.cancel()
            raise


def _error(status: int, line: str, path: str, close: bool = False) -> JSONResponse:
    """{"error": line}, or OpenAI's error object under /v1/."""
    payload = {"error": line}
    if path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        payload = {"error": {"message": line, "type": kind, "param": None, "code": None}}
    headers = {"Connection": "close"} if close else None
    return JSONResponse(payload, status_code=status, headers=headers)


def make_app(service: Service) -> Starlette:
    pool = service.pool

    async def health(request):
        return JSONResponse({"status": "ok", "adapters": len(pool.names)})

    async def adapters(request):
        return JSONResponse({"adapters": pool.info()})

    async def metrics(request):
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE)

    async def predict(request):
        rows = parse_inputs(await service.body(request), service.max_batch, service.max_input_chars)
        pool.check(rows)  # a bad row costs no model time
        results = await service.run(rows)
        default = pool.names[0]
        return JSONResponse({"outputs": [{"adapter": r.get(ADAPTER_FIELD, default), "prediction": res.text}
                                         for r, res in zip(rows, results)]})

    routes = [Route("/health", health, methods=["GET"]), Route("/adapters", adapters, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"]), Route("/predict", predict, methods=["POST"]),
              *openai_api.routes(service)]

    async def http_error(request, exc: HTTPException):
        path = request.url.path
        if exc.status_code == 404:
            return _error(404, f"no endpoint {path}; use {_listing()}", path)
        if exc.status_code == 405:
            return _error(405, f"{request.method} {path}: use {ENDPOINTS.get(path, 'another method')}", path)
        return _error(exc.status_code, str(exc.detail).splitlines()[0], path)

    async def refused(request, exc: Refused):
        return _error(exc.status, str(exc), request.url.path, exc.close)

    async def ptune_error(request, exc: PtuneError):
        return _error(400, str(exc), request.url.path)

    async def server_error(request, exc: Exception):  # Starlette answers with it, then re-raises to _Guard (logged)
        line = str(exc).splitlines()[0] if str(exc) else ""
        return _error(500, f"{type(exc).__name__}: {line}", request.url.path)

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Refused: refused,
                                                       PtuneError: ptune_error, Exception: server_error})
    return _Guard(app, service)


def _listing() -> str:
    return ", ".join(f"{m} {p}" for p, m in ENDPOINTS.items())


class _Guard:
    """The ASGI app around Starlette: refuses what the parser let through (too many headers, HTTP/2+ request
    lines), answers every Refused / PtuneError / exception as one JSON line, and counts requests."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        t0 = time.monotonic()
        started = {}

        async def sending(message):
            if message["type"] == "http.response.start":
                started["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-ptune-replica", PID)]}
            await send(message)

        try:
            if len(scope.get("raw_path", b"")) + len(scope.get("query_string", b"")) > MAX_URL:
                raise Refused(HTTPStatus.REQUEST_URI_TOO_LONG, f"the URL is longer than {MAX_URL} bytes", close=True)
            if len(scope["headers"]) > MAX_HEADERS:
                raise Refused(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                              f"{len(scope['headers'])} header lines, more than {MAX_HEADERS}", close=True)
            if sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > MAX_HEAD:
                raise Refused(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"the headers are longer than {MAX_HEAD} "
                              f"bytes", close=True)
            if scope.get("http_version") not in ("1.0", "1.1"):
                raise Refused(HTTPStatus.BAD_REQUEST, f"HTTP/{scope.get('http_version')} is not served; use HTTP/1.1",
                              close=True)
            await self.app(scope, receive, sending)
            response = None
        except Refused as e:
            response = _error(e.status, str(e), path, e.close)
        except PtuneError as e:
            response = _error(400, str(e), path)
        except ClientDisconnect:
            return
        except Exception as e:  # noqa: BLE001 -- one request fails, the server stays up
            log.error("request failed:\n%s", traceback.format_exc())
            line = str(e).splitlines()[0] if str(e) else ""
            response = _error(500, f"{type(e).__name__}: {line}", path)
        if response is not None and "status" not in started:
            await response(scope, receive, sending)
        endpoint = path if path in ENDPOINTS else "other"
        self.service.metrics.answered(endpoint, started.get("status", 500), time.monotonic() - t0)


class _Conn(h11.Connection):
    """h11's connection, keeping the protocol error it raised (uvicorn's handler drops it)."""

    error: h11.RemoteProtocolError | None = None

    def next_event(self):
        try:
            return super().next_event()
        except h11.RemoteProtocolError as e:
            self.error = e
            raise


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with ptune's connection rules (module docstring): JSON for the parser's own
    refusals (400, 414, 431), a deadline for the request line and headers, a cap on open connections."""

    def __init__(self, config, server_state, app_state, _loop=None):
        super().__init__(config, server_state, app_state, _loop)
        self.conn = _Conn(h11.SERVER, self.conn._max_incomplete_event_size)
        self.limits = config.ptune_limits
        self._deadline = None

    def connection_made(self, transport):
        super().connection_made(transport)
        if len(self.connections) > self.limits["max_connections"]:
            self._raw(503, f"more than max_connections={self.limits['max_connections']} connections are open; "
                           f"retry shortly", retry=True)
            return
        self._arm()

    def _arm(self):
        self._disarm()
        self._deadline = self.loop.call_later(self.limits["timeout"], self._headers_late)

    def _disarm(self):
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self):
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self):
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:
            self._disarm()  # a whole request line and headers: the app's own timeout covers the body

    def on_response_complete(self):
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc):
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        error = self.conn.error
        status, line = 400, f"the request cannot be parsed: {error}" if error else msg
        if error is not None and error.error_status_hint == 431:
            head = self.conn.trailing_data[0]
            if b"\r\n" not in head and b"\n" not in head:
                status, line = 414, "the request line (URL) is longer than this server reads"
            else:
                status, line = 431, "the request headers are longer than this server reads"
        self._raw(status, line)

    def _raw(self, status: int, line: str, retry: bool = False) -> None:
        body = json.dumps({"error": line}).encode()
        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n" + ("retry-after: 1\r\n" if retry else "") + "\r\n")
        self.transport.write(head.encode() + body)
        self.transport.close()


class _Uvicorn(uvicorn.Server):
    """uvicorn's server without its own signal handlers: `serve` installs ptune's (the ready line comes after them)."""

    def capture_signals(self):
        return contextlib.nullcontext()


class Server:
    """A bound, not yet serving server: serve_forever() in any thread, shutdown() from another,
    server_close() after (server_address: the bound (host, port); port 0 lets the OS pick)."""

    def __init__(self, service: Service, host: str, port: int, max_connections: int, timeout: float):
        self.service = service
        self.sock = socket.create_server((host, port), backlog=1024)
        self.server_address = self.sock.getsockname()[:2]
        config = uvicorn.Config(make_app(service), http=_Protocol, lifespan="off", log_config=None, access_log=False,
                                h11_max_incomplete_event_size=MAX_URL + MAX_HEAD,
                                timeout_keep_alive=timeout, timeout_graceful_shutdown=timeout + 5, backlog=1024)
        config.ptune_limits = {"max_connections": max_connections, "timeout": timeout}
        self._uv = _Uvicorn(config)
        self._stopped = threading.Event()

    def serve_forever(self) -> None:
        self.service.scheduler.start()
        try:
            asyncio.run(self._uv.serve(sockets=[self.sock]))
        finally:
            self._stopped.set()

    def stop_soon(self) -> None:
        """Graceful stop (a second call: stop without waiting for the requests in flight)."""
        if self._uv.should_exit:
            self._uv.force_exit = True
        self._uv.should_exit = True

    def shutdown(self) -> None:
        self.stop_soon()
        self._stopped.wait(60)

    def server_close(self) -> None:
        self.service.scheduler.stop(timeout=self.service.timeout + 5)
        self.sock.close()


def make_server_checks(max_batch, max_input_chars, max_batch_rows, max_wait_ms, max_connections, timeout,
                       max_tokens) -> None:
    """One PtuneError line for a server key out of range (the CLI checks its text first: ptune.config)."""
    for key, value, least in (("max_batch", max_batch, 1), ("max_input_chars", max_input_chars, 1),
                              ("max_batch_rows", max_batch_rows, 1), ("max_wait_ms", max_wait_ms, 0),
                              ("max_connections", max_connections, 1), ("max_tokens", max_tokens, 1)):
        if float(value) < least:
            raise PtuneError(f"{key}={value} is invalid: at least {least}")
    if float(timeout) <= 0:
        raise PtuneError(f"timeout={timeout} is invalid: seconds > 0")


def make_server(pool: Pool, host: str = DEFAULTS["host"], port: int = DEFAULTS["port"],
                max_batch: int = DEFAULTS["max_batch"], max_input_chars: int = DEFAULTS["max_input_chars"],
                max_batch_rows: int = DEFAULTS["max_batch_rows"], max_wait_ms: float = DEFAULTS["max_wait_ms"],
                max_connections: int = DEFAULTS["max_connections"], timeout: float = DEFAULTS["timeout"],
                max_tokens: int = DEFAULTS["max_tokens"]) -> Server:
    """A bound, not yet serving server (see Server)."""
    make_server_checks(max_batch, max_input_chars, max_batch_rows, max_wait_ms, max_connections, timeout, max_tokens)
    service = Service(pool, int(max_batch), int(max_input_chars), max_batch_rows, max_wait_ms, float(timeout),
                      int(max_tokens))
    return Server(service, host, port, int(max_connections), float(timeout))


_serving: list[Server] = []


def _interrupt(signum, frame):
    """SIGINT / SIGTERM: a serving server stops gracefully (a second one: at once); before it serves, stop here."""
    if _serving:
        _serving[-1].stop_soon()
        return
    raise KeyboardInterrupt


def serve(spec: str, host: str, port: int, max_batch: int, max_input_chars: int,
          max_batch_rows: int = DEFAULTS["max_batch_rows"], max_wait_ms: float = DEFAULTS["max_wait_ms"],
          max_connections: int = DEFAULTS["max_connections"], timeout: float = DEFAULTS["timeout"],
          max_tokens: int = DEFAULTS["max_tokens"], workers: int = DEFAULTS["workers"], which: str = "adapter",
          trust_remote_code: bool = False) -> int:
    """Load the runs, serve until Ctrl-C or SIGTERM, then answer the requests in flight and exit.
    Prints the URL once bound. workers > 1: that many replica processes behind the one port (`_replicas`)."""
    keys = dict(max_batch=max_batch, max_input_chars=max_input_chars, max_batch_rows=max_batch_rows,
                max_wait_ms=max_wait_ms, max_connections=max_connections, timeout=timeout, max_tokens=max_tokens)
    if int(workers) > 1:
        return _replicas(spec, host, port, int(workers), keys, which, trust_remote_code)
    pool = Pool.load(parse_runs(spec), which, trust_remote_code)
    try:
        server = make_server(pool, host, port, **keys)
    except OSError as e:
        raise PtuneError(f"cannot listen on {host}:{port}: {e.strerror}; choose another port= (port=0: any free one)") from None
    _own_signals()
    try:  # from here a Ctrl-C raises KeyboardInterrupt until the server serves, then stops it gracefully
        _ready(pool.names, server.server_address)
        _serving.append(server)
        server.serve_forever()
        print("stopped", flush=True)
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        if server in _serving:
            _serving.remove(server)
        server.server_close()
    return 0


def _own_signals() -> None:
    if threading.current_thread() is threading.main_thread():  # a process manager's SIGTERM stops it like Ctrl-C
        # Ctrl-C too, explicitly: a process started in the background (a shell's `&`, some supervisors) inherits
        # SIGINT ignored or blocked, and Python then installs no KeyboardInterrupt handler of its own. Before the
        # ready line, which tells a caller the server is up: a Ctrl-C sent as soon as it reads it must stop it.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.signal(signal.SIGINT, _interrupt)
        signal.signal(signal.SIGTERM, _interrupt)


def _ready(names: list[str], address, replicas: int = 1) -> None:
    where = f" in {replicas} replica processes" if replicas > 1 else ""
    print(f"serving {len(names)} adapter(s) ({', '.join(names)}) at http://{address[0]}:{address[1]}{where} "
          f"(Ctrl-C stops)", flush=True)


def _replicas(spec: str, host: str, port: int, workers: int, keys: dict, which: str, trust_remote_code: bool) -> int:
    """`workers` replica processes behind one port, through uvicorn's own process supervisor: the port is bound
    here, each replica (a spawned process) loads the runs and serves on the shared socket with its own backbone,
    scheduler and metrics; the kernel hands each new connection to one of them. SIGTERM / Ctrl-C: uvicorn
    stops every replica gracefully (each answers its requests in flight)."""
    runs = parse_runs(spec)
    for path in runs.values():  # a bad run fails here in one line, not in every replica
        load_run(path, trust_remote_code)
    make_server_checks(**keys)
    try:
        sock = socket.create_server((host, port), backlog=1024)
    except OSError as e:
        raise PtuneError(f"cannot listen on {host}:{port}: {e.strerror}; choose another port= (port=0: any free one)") from None
    os.environ[REPLICA_ENV] = json.dumps({"spec": spec, "which": which, "trust_remote_code": trust_remote_code, **keys})
    config = uvicorn.Config(f"{__name__}:replica_app", factory=True, http=_Protocol, workers=workers, lifespan="off",
                            log_config=None, access_log=False, timeout_keep_alive=float(keys["timeout"]),
                            timeout_graceful_shutdown=float(keys["timeout"]) + 5, h11_max_incomplete_event_size=MAX_URL + MAX_HEAD)
    config.ptune_limits = {"max_connections": int(keys["max_connections"]), "timeout": float(keys["timeout"])}
    _own_signals()
    try:
        _ready(list(runs), sock.getsockname()[:2], workers)
        Multiprocess(config, sockets=[sock]).run()  # its own signal handlers and health checks
        print("stopped", flush=True)
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        sock.close()
    return 0


def replica_app():
    """One replica's app (uvicorn's factory, in a process `_replicas` spawned): the settings from REPLICA_ENV."""
    global PID
    PID = str(os.getpid()).encode()
    s = json.loads(os.environ[REPLICA_ENV])
    pool = Pool.load(parse_runs(s["spec"]), s["which"], s["trust_remote_code"])  # keys checked by _replicas
    service = Service(pool, int(s["max_batch"]), int(s["max_input_chars"]), s["max_batch_rows"], s["max_wait_ms"],
                      float(s["timeout"]), int(s["max_tokens"]))
    service.scheduler.start()  # a daemon thread: uvicorn drains the requests in flight before the process ends
    return make_app(service)
