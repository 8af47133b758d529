"""`ptune serve run=<dir>[,<dir>...]`: a small JSON-over-HTTP server for a Pool of adapters.

    GET  /health     {"status": "ok", "adapters": K}
    GET  /adapters   {"adapters": [{name, method, task, head, prompt_length, labels?, fields, run}, ...]}
    POST /predict    {"inputs": [{"adapter": "sst2", "sentence": "..."}, ...]}
                  -> {"outputs": [{"adapter": "sst2", "prediction": "positive"}, ...]}   (input order)

Every failure is a JSON body {"error": "<one line>"} with a 4xx status, and the server goes on
serving: malformed JSON or no "inputs" list (400), empty inputs (400), unknown adapter or a
missing or non-text field (400, the Pool's own message), more rows than max_batch or a field
longer than max_input_chars or a body past their product (413), no Content-Length (411), an
unknown path (404), a method other than GET/POST on a known path (405). An unexpected exception
inside the model call is a 500 with its one line (and the traceback in the server's log).

Concurrency: stdlib `ThreadingHTTPServer` (one thread per connection, so a slow client never
blocks another's parsing), and ONE lock around the model call: the frozen backbone runs one
request's mixed batch at a time, in arrival order of the lock. Rows of one request are batched
together (Pool.predict, batch_size rows per forward, any mix of adapters); rows of different
requests are not merged (a batching queue would be the next step, for the serving benchmark to
justify). Localhost by default: the server has no authentication.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ptune.errors import PtuneError
from ptune.infer.pool import ADAPTER_FIELD, Pool, parse_runs

log = logging.getLogger("ptune.serve")

DEFAULTS = {"host": "127.0.0.1", "port": 8000, "max_batch": 64, "max_input_chars": 4000, "batch_size": 16}


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


def make_server(pool: Pool, host: str = DEFAULTS["host"], port: int = DEFAULTS["port"],
                max_batch: int = DEFAULTS["max_batch"], max_input_chars: int = DEFAULTS["max_input_chars"],
                batch_size: int = DEFAULTS["batch_size"]) -> ThreadingHTTPServer:
    """A bound, not yet serving server (port 0: the OS picks one; see server.server_address)."""
    lock = threading.Lock()
    max_body = max_batch * (max_input_chars + 1024)  # every row at its largest, with room for field names

    class Handler(BaseHTTPRequestHandler):
        server_version = "ptune"

        def log_message(self, fmt, *args):  # through logging, not raw stderr lines
            log.info("%s %s", self.address_string(), fmt % args)

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

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(spec: str, host: str, port: int, max_batch: int, max_input_chars: int, batch_size: int) -> int:
    """Load the runs, serve until Ctrl-C or SIGTERM, then close the socket. Prints the URL once bound."""

    pool = Pool.load(parse_runs(spec))
    try:
        server = make_server(pool, host, port, max_batch, max_input_chars, batch_size)
    except OSError as e:
        raise PtuneError(f"cannot listen on {host}:{port}: {e.strerror}; choose another port= (port=0: any free one)") from None
    bound_host, bound_port = server.server_address[:2]
    print(f"serving {len(pool.names)} adapter(s) ({', '.join(pool.names)}) at http://{bound_host}:{bound_port} "
          f"(Ctrl-C stops)", flush=True)
    if threading.current_thread() is threading.main_thread():  # a process manager's SIGTERM stops it like Ctrl-C
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
    return 0
