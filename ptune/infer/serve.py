"""`ptune serve run=<dir>[,<dir>...]`: a small JSON-over-HTTP server for a Pool of adapters.

    GET  /health     {"status": "ok", "adapters": K}
    GET  /adapters   {"adapters": [{name, method, task, head, prompt_length, labels?, fields, run}, ...]}
    POST /predict    {"inputs": [{"adapter": "sst2", "sentence": "..."}, ...]}
                  -> {"outputs": [{"adapter": "sst2", "prediction": "positive"}, ...]}   (input order)

Every client mistake is a JSON body {"error": "<one line>"} with a 4xx status, and the server goes
on serving: a body that is not JSON, or JSON the decoder refuses (nesting too deep, an integer of
thousands of digits), or no "inputs" list (400), empty inputs (400), unknown adapter or a missing,
non-text or empty field (400, the Pool's own message), more rows than max_batch or a field longer
than max_input_chars or a body past their product (413), no Content-Length (411), an unknown path
(404), a method no endpoint takes (405), and what the standard library's HTTP layer itself
answers (a garbage request line or an unsupported HTTP version 400, a URL too long 414, headers too long
or too many 431): all JSON with a status line, never its HTML pages. A client that stops sending (request line, headers
or body) is closed after `timeout` seconds (a body that stops is answered 408 first). An unexpected exception inside the
model call is a 500 with its one line (and the traceback in the server's log).

Concurrency: stdlib `ThreadingHTTPServer` (one thread per connection, so a slow client never
blocks another's parsing), at most `max_threads` at once: a connection beyond them waits in the
listen queue until a thread is free (backpressure, not an error). ONE lock around the model call:
the frozen backbone runs one request's mixed batch at a time, in arrival order of the lock. Rows of
one request are batched together (Pool.predict, batch_size rows per forward, any mix of adapters);
rows of different requests are not merged. SIGTERM (or Ctrl-C) closes the listening socket, lets
the requests in flight finish and answer, then exits. Localhost by default: the server has no
authentication.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ptune.errors import PtuneError
from ptune.infer.pool import ADAPTER_FIELD, Pool, parse_runs

log = logging.getLogger("ptune.serve")

DEFAULTS = {"host": "127.0.0.1", "port": 8000, "max_batch": 64, "max_input_chars": 4000, "batch_size": 16,
            "max_threads": 64, "timeout": 10}
# http.server's own refusals, as the status a client mistake gets (501 "Unsupported method": 405)
# (and 505 "Invalid HTTP version": 400, the client's mistake like any other malformed request line)
_LAYER_STATUS = {HTTPStatus.NOT_IMPLEMENTED: HTTPStatus.METHOD_NOT_ALLOWED,
                 HTTPStatus.HTTP_VERSION_NOT_SUPPORTED: HTTPStatus.BAD_REQUEST}


class Refused(Exception):
    """A request the server answers with `status` and {"error": message}."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def parse_inputs(body: bytes, max_batch: int, max_input_chars: int) -> list[dict]:
    """The request's rows, or Refused with the one line that says what is wrong."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Refused(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise Refused(HTTPStatus.BAD_REQUEST, "the body's JSON nests too deeply; send flat rows") from None
    except ValueError as e:  # e.g. an integer past Python's digit limit for int(str)
        raise Refused(HTTPStatus.BAD_REQUEST, f"the body's JSON cannot be read: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("inputs"), list):
        raise Refused(HTTPStatus.BAD_REQUEST, 'the body must be {"inputs": [{"adapter": "<name>", ...fields}, ...]}')
    rows = data["inputs"]
    if not rows:
        raise Refused(HTTPStatus.BAD_REQUEST, "inputs is empty; send at least one row")
    if len(rows) > max_batch:
        raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                      f"{len(rows)} inputs, more than this server's max_batch={max_batch}; split the request")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise Refused(HTTPStatus.BAD_REQUEST, f"input {i} is not an object of named fields")
        for key, value in row.items():
            if isinstance(value, str) and len(value) > max_input_chars:
                raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              f"input {i} field {key!r} has {len(value)} characters, more than this server's "
                              f"max_input_chars={max_input_chars}")
    return rows


class BoundedServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with at most `max_threads` handler threads; a connection past them waits
    in the listen queue. On close the requests in flight are given `drain_s` seconds to finish and
    answer (their threads are joined up to then; they are daemon threads, so a stuck one cannot keep
    the process from exiting)."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024

    def __init__(self, address, handler, max_threads: int, drain_s: float):
        self._slots = threading.BoundedSemaphore(max_threads)
        self._closing = threading.Event()
        self._active: set[threading.Thread] = set()
        self._active_lock = threading.Lock()
        self.drain_s = drain_s
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        while not self._slots.acquire(timeout=0.2):
            if self._closing.is_set():
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        me = threading.current_thread()
        with self._active_lock:
            self._active.add(me)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._active_lock:
                self._active.discard(me)
            self._slots.release()

    def server_close(self):
        """Stop accepting (the listening socket closes), then let the requests in flight answer."""
        self._closing.set()
        super().server_close()
        deadline = time.monotonic() + self.drain_s
        with self._active_lock:
            active = list(self._active)
        for t in active:
            t.join(max(0.0, deadline - time.monotonic()))


def make_server(pool: Pool, host: str = DEFAULTS["host"], port: int = DEFAULTS["port"],
                max_batch: int = DEFAULTS["max_batch"], max_input_chars: int = DEFAULTS["max_input_chars"],
                batch_size: int = DEFAULTS["batch_size"], max_threads: int = DEFAULTS["max_threads"],
                timeout: int = DEFAULTS["timeout"]) -> BoundedServer:
    """A bound, not yet serving server (port 0: the OS picks one; see server.server_address)."""
    lock = threading.Lock()
    max_body = max_batch * (max_input_chars + 1024)  # every row at its largest, with room for field names

    class Handler(BaseHTTPRequestHandler):
        server_version = "ptune"

        def setup(self):
            self.timeout = timeout  # StreamRequestHandler puts it on the socket: every read waits at most this
            super().setup()

        def log_message(self, fmt, *args):  # through logging, not raw stderr lines
            log.info("%s %s", self.address_string(), fmt % args)

        def send_error(self, code, message=None, explain=None):
            """http.server's own refusals (bad request line, long headers, unknown method, ...) as
            one-line JSON instead of its HTML page."""
            status = _LAYER_STATUS.get(HTTPStatus(code), HTTPStatus(code))
            line = (message or HTTPStatus(code).phrase).splitlines()[0]
            if status == HTTPStatus.METHOD_NOT_ALLOWED:
                line = f"method {self.command!r} is not served; use GET /health, GET /adapters, POST /predict"
            self.close_connection = True
            if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":  # unparsed line: answer with a status line
                self.request_version = "HTTP/1.0"
            try:
                self._send(status, {"error": line})
            except OSError:  # the client is gone
                pass

        def _send(self, status: HTTPStatus, payload: dict) -> None:
            body = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _answer(self, work) -> None:
            try:
                self._send(HTTPStatus.OK, work())
            except Refused as e:
                self._send(e.status, {"error": str(e)})
            except TimeoutError:
                self.close_connection = True
                self._send(HTTPStatus.REQUEST_TIMEOUT, {"error": f"the request body did not arrive within {timeout} s"})
            except PtuneError as e:
                self._send(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            except Exception as e:  # noqa: BLE001 -- one request fails, the server stays up
                log.error("request failed:\n%s", traceback.format_exc())
                line = str(e).splitlines()[0] if str(e) else ""
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {line}"})

        def do_GET(self):  # noqa: N802 -- http.server's naming
            if self.path == "/health":
                return self._answer(lambda: {"status": "ok", "adapters": len(pool.names)})
            if self.path == "/adapters":
                return self._answer(lambda: {"adapters": pool.info()})
            return self._refuse_path("GET")

        def do_POST(self):  # noqa: N802
            if self.path != "/predict":
                return self._refuse_path("POST")
            return self._answer(self._predict)

        def _refuse_path(self, method: str) -> None:
            known = {"/health": "GET", "/adapters": "GET", "/predict": "POST"}
            if self.path in known:
                status, msg = HTTPStatus.METHOD_NOT_ALLOWED, f"{method} {self.path}: use {known[self.path]}"
            else:
                status, msg = HTTPStatus.NOT_FOUND, f"no endpoint {self.path}; use GET /health, GET /adapters, POST /predict"
            self._send(status, {"error": msg})

        def do_PUT(self):  # noqa: N802 -- and DELETE, PATCH: no endpoint takes them
            self._refuse_path(self.command)

        do_DELETE = do_PATCH = do_PUT

        def _predict(self) -> dict:
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise Refused(HTTPStatus.LENGTH_REQUIRED, "POST /predict needs a Content-Length header")
            if int(length) > max_body:
                self.close_connection = True  # the unread body is dropped with the connection
                raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              f"the body has {length} bytes, more than this server's limit of {max_body}")
            rows = parse_inputs(self.rfile.read(int(length)), max_batch, max_input_chars)
            pool.check(rows)  # a bad row costs no model time and never waits for the lock
            with lock:
                preds = pool.predict(rows, batch_size)
            default = pool.names[0]
            return {"outputs": [{"adapter": r.get(ADAPTER_FIELD, default), "prediction": p}
                                for r, p in zip(rows, preds)]}

    return BoundedServer((host, port), Handler, max_threads, drain_s=timeout + 5)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(spec: str, host: str, port: int, max_batch: int, max_input_chars: int, batch_size: int,
          max_threads: int = DEFAULTS["max_threads"], timeout: int = DEFAULTS["timeout"], which: str = "adapter",
          trust_remote_code: bool = False) -> int:
    """Load the runs, serve until Ctrl-C or SIGTERM, then close the socket and answer the requests in
    flight. Prints the URL once bound."""

    pool = Pool.load(parse_runs(spec), which, trust_remote_code)
    try:
        server = make_server(pool, host, port, max_batch, max_input_chars, batch_size, max_threads, timeout)
    except OSError as e:
        raise PtuneError(f"cannot listen on {host}:{port}: {e.strerror}; choose another port= (port=0: any free one)") from None
    bound_host, bound_port = server.server_address[:2]
    if threading.current_thread() is threading.main_thread():  # a process manager's SIGTERM stops it like Ctrl-C
        # Ctrl-C too, explicitly: a process started in the background (a shell's `&`, some supervisors) inherits
        # SIGINT ignored or blocked, and Python then installs no KeyboardInterrupt handler of its own. Before the
        # line below, which tells a caller the server is up: a Ctrl-C sent as soon as it reads it must stop it.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.signal(signal.SIGINT, _interrupt)
        signal.signal(signal.SIGTERM, _interrupt)
    try:  # from here a Ctrl-C raises KeyboardInterrupt, the ready line included
        print(f"serving {len(pool.names)} adapter(s) ({', '.join(pool.names)}) at http://{bound_host}:{bound_port} "
              f"(Ctrl-C stops)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
    return 0
