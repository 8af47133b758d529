"""`ptune serve` under hostile clients, over a real socket on localhost (ptune/infer/serve.py).

Every client mistake is a 4xx with a one-line JSON body, including what the JSON decoder raises and
what the HTTP parser (uvicorn's h11) itself refuses; a client that stops sending is closed after the
timeout; open connections are bounded (one more is a JSON 503); a stop answers the requests in flight
before the process exits.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ptune.cli import main
from ptune.infer.pool import Pool
from ptune.infer.serve import make_server

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["train", "model=tiny-llama", "task=sst2", "method=prompt", "method.num_virtual_tokens=3",
         "task.max_train_samples=16", "task.max_eval_samples=4", "trainer.batch_size=4", "trainer.max_steps=2",
         "trainer.eval_every=2", "trainer.save_every=2"]
TIMEOUT = 1  # seconds a silent client is given
MAX_CONNECTIONS = 6


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("serve")
    assert main([*TRAIN, f"output_dir={out}"]) == 0
    return next(out.rglob("config.yaml")).parent


@pytest.fixture(scope="module")
def server(run):
    pool = Pool.load([str(run)])
    srv = make_server(pool, port=0, max_connections=MAX_CONNECTIONS, timeout=TIMEOUT)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def exchange(server, raw: bytes, wait: float = 5.0) -> tuple[int, dict | None, bytes]:
    """Send raw bytes, read one answer (to its Content-Length, or until the server closes): (status, JSON
    body or None, raw reply)."""
    with socket.create_connection(server.server_address[:2], timeout=wait) as s:
        s.sendall(raw)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
            head, sep, rest = reply.partition(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
            if sep and length and len(rest) >= length[0]:
                break
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head.startswith(b"HTTP/") else 0
    try:
        return status, json.loads(body), reply
    except ValueError:
        return status, None, reply


def post(body: bytes) -> bytes:
    return b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " + \
        str(len(body)).encode() + b"\r\n\r\n" + body


CLIENT_MISTAKES = {
    "garbage-request-line": (b"HELLO THERE\r\n\r\n", 400),
    "binary-request-line": (b"\x00\x01\x02\xff\r\n\r\n", 400),
    "unknown-method": (b"BREW /predict HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    "http-version": (b"GET /health HTTP/3.0\r\nHost: x\r\n\r\n", 400),
    "no-host": (b"GET /health HTTP/1.1\r\n\r\n", 400),
    "long-header": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    "many-headers": (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n", 431),
    "long-url": (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    "long-url-in-pieces": (b"GET /" + b"a" * 100_000, 414),  # past the parser's buffer before the line ends
    "deep-nesting": (post(b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400),
    "huge-integer": (post(b'{"inputs": [{"sentence": "x", "n": ' + b"9" * 5000 + b"}]}"), 400),
    "not-json": (post(b"{inputs: nope"), 400),
    "not-utf8": (post(b'{"inputs": ["\xff\xfe"]}'), 400),
    "empty-text": (post(b'{"inputs": [{"sentence": ""}]}'), 400),
    "no-length": (b"POST /predict HTTP/1.1\r\nHost: x\r\n\r\n", 411),
    "unknown-path": (b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n", 404),
}


@pytest.mark.parametrize("case", CLIENT_MISTAKES)
def test_every_client_mistake_is_a_4xx_with_one_json_line(server, case):
    raw, want = CLIENT_MISTAKES[case]
    status, body, reply = exchange(server, raw)
    assert status == want, reply[:300]
    assert body is not None and set(body) == {"error"}, reply[:300]
    assert body["error"] and "\n" not in body["error"]
    # ... and the server keeps serving
    assert exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200


def test_a_body_that_stops_arriving_is_answered_408_and_closed(server):
    t0 = time.monotonic()
    status, body, _ = exchange(server, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"inputs\"")
    assert status == 408 and "did not arrive" in body["error"]
    assert time.monotonic() - t0 < TIMEOUT + 3


def test_a_silent_connection_is_closed_after_the_timeout(server):
    with socket.create_connection(server.server_address[:2], timeout=10) as s:
        t0 = time.monotonic()
        assert s.recv(1) == b""  # closed by the server, nothing sent
        assert TIMEOUT - 0.2 < time.monotonic() - t0 < TIMEOUT + 3


def test_connections_are_bounded_and_one_more_gets_a_json_503(server):
    idle = [socket.create_connection(server.server_address[:2]) for _ in range(MAX_CONNECTIONS - 1)]  # slow-loris
    try:
        time.sleep(0.2)
        t0 = time.monotonic()  # idle connections hold no thread: a request beside them is answered at once
        assert exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200
        assert time.monotonic() - t0 < TIMEOUT
        idle.append(socket.create_connection(server.server_address[:2]))
        time.sleep(0.2)
        status, body, reply = exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503 and "max_connections=6" in body["error"] and b"retry-after: 1" in reply.lower()
        time.sleep(TIMEOUT + 0.5)  # the idle ones are closed at the deadline for their request line
        assert exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200
    finally:
        for s in idle:
            s.close()


def test_a_request_line_sent_byte_by_byte_is_cut_at_the_deadline(server):
    """Each byte resets no clock: the request line and headers have `timeout` seconds in all."""
    with socket.create_connection(server.server_address[:2], timeout=10) as s:
        t0 = time.monotonic()
        try:
            for byte in b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 100:
                s.sendall(bytes([byte]))
                time.sleep(0.05)
        except OSError:
            pass  # closed by the server
        assert s.recv(1) == b""
        assert time.monotonic() - t0 < TIMEOUT + 2


@pytest.mark.slow
def test_sigterm_answers_the_request_in_flight_then_exits(run, tmp_path):
    """A real `ptune serve` process whose model thread takes 2 s: SIGTERM arrives during it; the
    client still gets its 200 and the process exits 0 (the wrapper slows Pool.encode, as
    scripts/fault_inject.py wraps ptune's own functions; ptune has no test hooks)."""
    wrapper = ("import sys, time\nfrom ptune.infer import pool\nreal = pool.Pool.encode\n"
               "def slow(self, *a, **k):\n    time.sleep(2)\n    return real(self, *a, **k)\n"
               "pool.Pool.encode = slow\nfrom ptune.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", wrapper, "serve", f"run={run}", "port=0"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path)
    try:
        line = proc.stdout.readline()
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        result = {}

        def client():
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(post(b'{"inputs": [{"sentence": "a fine film"}]}'))
            result["reply"] = b"".join(iter(lambda: s.recv(65536), b""))

        t = threading.Thread(target=client)
        t.start()
        time.sleep(1.0)  # the request is inside the (slowed) model call
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert proc.wait(30) == 0
        head, _, body = result["reply"].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and "outputs" in json.loads(body)
    finally:
        proc.kill()


def test_the_commands_server_keys_reach_the_server(run, monkeypatch):
    """Every key of ptune serve (DEFAULTS) and adapter= are what the server is built with (not accepted and dropped)."""
    from ptune.infer import serve as serve_module

    seen = {}

    def fake(pool, host, port, max_batch, max_input_chars, max_batch_rows, max_wait_ms, max_connections, timeout,
             max_tokens):
        seen.update(host=host, port=port, max_batch=max_batch, max_input_chars=max_input_chars,
                    max_batch_rows=max_batch_rows, max_wait_ms=max_wait_ms, max_connections=max_connections,
                    timeout=timeout, max_tokens=max_tokens, pool=pool)
        raise OSError(98, "Address already in use")

    monkeypatch.setattr(serve_module, "make_server", fake)
    argv = ["serve", f"run={run}", "port=0", "max_connections=3", "timeout=7", "max_batch=5", "max_input_chars=99",
            "max_batch_rows=2", "max_wait_ms=11", "max_tokens=9", "adapter=adapter_best"]
    assert main(argv) == 2  # the fake refuses to bind: one line, after the keys were handed over
    assert {k: v for k, v in seen.items() if k != "pool"} == dict(
        host="127.0.0.1", port=0, max_batch=5, max_input_chars=99, max_batch_rows=2, max_wait_ms=11, max_connections=3,
        timeout=7, max_tokens=9)
    assert set(seen) - {"pool"} == set(serve_module.DEFAULTS) - {"workers"}  # workers: the next test


def test_workers_start_replicas_with_every_key(run, monkeypatch):
    from ptune.infer import serve as serve_module

    seen = {}
    monkeypatch.setattr(serve_module, "_replicas", lambda *a: seen.update(args=a) or 0)
    argv = ["serve", f"run={run}", "port=0", "workers=3", "max_batch_rows=2", "max_wait_ms=11", "timeout=7"]
    assert main(argv) == 0
    spec, host, port, workers, keys, which, trust = seen["args"]
    assert (spec, host, port, workers, which, trust) == (str(run), "127.0.0.1", 0, 3, "adapter", False)
    assert keys == dict(max_batch=64, max_input_chars=4000, max_batch_rows=2, max_wait_ms=11, max_connections=256,
                        timeout=7, max_tokens=256)


@pytest.mark.slow  # three processes
def test_two_replicas_answer_behind_one_port_and_stop_on_sigterm(run, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "ptune", "serve", f"run={run}", "port=0", "workers=2"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        assert "in 2 replica processes" in line, line
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        replicas, deadline = set(), time.monotonic() + 120
        while len(replicas) < 2 and time.monotonic() < deadline:  # new connections until both have answered
            with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                reply = b"".join(iter(lambda: s.recv(65536), b""))
                assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
                head = reply.partition(b"\r\n\r\n")[0].lower()
                replicas.add(head.split(b"x-ptune-replica: ")[1].split(b"\r\n")[0])
        assert len(replicas) == 2 and str(proc.pid).encode() not in replicas
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0 and proc.stdout.read().strip().endswith("stopped")
    finally:
        proc.kill()


def test_batch_size_is_refused_by_serve_with_its_replacement(run, capsys):
    assert main(["serve", f"run={run}", "batch_size=4"]) == 2
    assert "unexpected argument 'batch_size=4'" in capsys.readouterr().err


@pytest.mark.slow  # a server process
def test_ctrl_c_stops_a_server_started_with_sigint_ignored(run, tmp_path):
    """A background job (a shell's `&`, some supervisors) starts with SIGINT ignored, and Python then
    installs no KeyboardInterrupt handler: ptune serve installs its own, so Ctrl-C still stops it."""
    proc = subprocess.Popen([sys.executable, "-m", "ptune", "serve", f"run={run}", "port=0"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert "serving 1 adapter(s)" in proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        proc.kill()


def test_the_ready_line_comes_after_the_ctrl_c_handler(run, monkeypatch, capsys):
    """The line `serving ... (Ctrl-C stops)` tells a caller the server is up; a Ctrl-C sent the moment
    it is read must stop it, so the handler is in place before it is printed (a SIGINT before the
    handler, under an inherited SIG_IGN, was lost and the server ran on)."""
    from ptune.infer import serve as serve_module

    seen = {}

    def ready(*args, **kwargs):
        if str(args[0]).startswith("serving"):
            seen["handler"] = signal.getsignal(signal.SIGINT)
            raise KeyboardInterrupt  # as the Ctrl-C a caller sends on reading the line
        return print(*args, **kwargs)

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # started in the background
    try:
        monkeypatch.setattr(serve_module, "print", ready, raising=False)
        try:
            rc = serve_module.serve(str(run), "127.0.0.1", 0, 64, 10_000, 8)
        except KeyboardInterrupt:
            rc = "a Ctrl-C at the ready line escaped the server loop"
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen["handler"] is serve_module._interrupt
    assert rc == 0
    assert capsys.readouterr().out.strip().endswith("stopped")
