"""`ptune serve`: JSON over a real socket. A good request gets every row its adapter's answer; each
bad request gets a JSON {"error": ...} with a 4xx status while the server keeps serving; the CLI
prints its URL and stops cleanly on Ctrl-C (SIGINT) or SIGTERM."""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from ptune.infer.serve import make_server
from conftest import CAUSAL, MRS, build_pool, make_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def server(data_dir):
    pool = build_pool("tiny-llama", {k: CAUSAL[k] for k in ("lin", "verb_prefix", "gen_prompt")})
    srv = make_server(pool, "127.0.0.1", 0, max_batch=4, max_input_chars=200)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield pool, srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def call(port: int, method: str, path: str, body=None, headers=None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers or {})
    response = conn.getresponse()
    status, payload = response.status, json.loads(response.read())
    conn.close()
    return status, payload


def test_good_requests(server):
    pool, port = server
    assert call(port, "GET", "/health") == (200, {"status": "ok", "adapters": 3})
    status, payload = call(port, "GET", "/adapters")
    assert status == 200 and payload["adapters"] == pool.info()
    rows = [{"adapter": "gen_prompt", "mr": MRS[0]}, {"adapter": "lin", "sentence": "wow"},
            {"adapter": "verb_prefix", "sentence": "a fine movie"}]
    status, payload = call(port, "POST", "/predict", {"inputs": rows})
    assert status == 200
    assert payload == {"outputs": [{"adapter": r["adapter"], "prediction": p} for r, p in zip(rows, pool.predict(rows))]}


BAD = [
    ("POST", "/predict", b"{not json", 400, "the body is not JSON"),
    ("POST", "/predict", {"rows": []}, 400, 'the body must be {"inputs"'),
    ("POST", "/predict", {"inputs": []}, 400, "inputs is empty"),
    ("POST", "/predict", {"inputs": [{"adapter": "nope", "sentence": "x"}]}, 400, "unknown adapter 'nope'"),
    ("POST", "/predict", {"inputs": [{"adapter": "lin"}]}, 400, "needs a text field 'sentence'"),
    ("POST", "/predict", {"inputs": [{"adapter": "lin", "sentence": "x"}] * 5}, 413, "more than this server's max_batch=4"),
    ("POST", "/predict", {"inputs": [{"adapter": "lin", "sentence": "x" * 201}]}, 413, "max_input_chars=200"),
    ("POST", "/predict", {"inputs": ["text"]}, 400, "input 0 is not an object"),
    ("GET", "/predict", None, 405, "GET /predict: use POST"),
    ("DELETE", "/adapters", None, 405, "DELETE /adapters: use GET"),
    ("GET", "/nowhere", None, 404, "no endpoint /nowhere"),
]


@pytest.mark.parametrize("method, path, body, status, message", BAD, ids=[b[4][:24] for b in BAD])
def test_bad_requests_get_a_json_error_and_the_server_stays_up(server, method, path, body, status, message):
    _, port = server
    got, payload = call(port, method, path, body)
    assert got == status and list(payload) == ["error"] and message in payload["error"]
    assert "\n" not in payload["error"]
    assert call(port, "GET", "/health")[0] == 200


def test_oversized_body_is_refused_before_it_is_read(server):
    _, port = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.putrequest("POST", "/predict")
    conn.putheader("Content-Length", str(10 ** 9))  # announced, never sent
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "more than this server's limit" in json.loads(response.read())["error"]
    conn.close()
    assert call(port, "GET", "/health")[0] == 200


@pytest.mark.slow  # a `ptune serve` process per signal
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_cli_serves_until_stopped(tmp_path, data_dir, stop):
    run = make_run(tmp_path / "sst2run", "tiny-llama", CAUSAL["lin"], 0)
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "ptune", "serve", f"run=sst2:{run}", "port=0"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving 1 adapter(s) (sst2) at http://127.0.0.1:" in line, line + proc.stderr.read()
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        status, payload = call(port, "POST", "/predict", {"inputs": [{"sentence": "wow"}, {"adapter": "sst2", "sentence": "x"}]})
        assert status == 200 and [o["prediction"] in ("negative", "positive") for o in payload["outputs"]] == [True, True]
        proc.send_signal(stop)
        assert proc.wait(timeout=30) == 0 and proc.stdout.read() == "stopped\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
