"""Cross-request batching behind `ptune serve` (ptune/infer/batcher.py, continuous.py, openai_api.py).

Rows of different requests share forwards, bounded by max_batch_rows and max_wait_ms; rows are taken
round-robin over requests; generation rows join and leave one decoding batch at token boundaries and
decode what they decode alone; the OpenAI endpoints work with the real `openai` client (streaming too);
/metrics is Prometheus text. Tiny random models with random adapters (tests/conftest.py build_pool).
"""

import threading
import time

import openai
import pytest
import torch

from conftest import CAUSAL, MRS, build_pool
from ptune.infer.batcher import Job, Scheduler
from ptune.infer.serve import make_server

SENTENCES = ["a fine movie", "dull , long and the most boring film ever made", "wow", "not good at all, really not"]
CLASS = ("lin", "v2", "pt", "verb_prefix", "verb_prompt", "hard")


@pytest.fixture(scope="module")
def pool(data_dir):
    return build_pool("tiny-llama", CAUSAL)


@pytest.fixture(scope="module")
def server(pool):
    srv = make_server(pool, port=0, max_batch_rows=8, max_wait_ms=20, max_tokens=16)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


class Recorder:
    """Wraps the pool's mixed forwards and the decoder's joins: what each batch held."""

    def __init__(self, pool, monkeypatch):
        self.batches, self.joins = [], []
        real = pool._class_scores

        def class_scores(encoded):
            self.batches.append([e["adapter"] for e in encoded])
            return real(encoded)

        monkeypatch.setattr(pool, "_class_scores", class_scores)

    def watch(self, sched, monkeypatch):
        real = sched.decoder.join

        def join(rows):
            self.joins.append((len(rows), len(sched.decoder.rows)))
            return real(rows)

        monkeypatch.setattr(sched.decoder, "join", join)


def submit(sched, rows, **kw) -> tuple[Job, threading.Event, dict]:
    got, event = {}, threading.Event()

    def done(results, error):
        got.update(results=results, error=error)
        event.set()

    return sched.submit(Job(rows, done, **kw)), event, got


def wait(*events, timeout=60):
    for e in events:
        assert e.wait(timeout)


def test_rows_of_different_requests_share_a_forward_and_get_their_own_answers(pool, monkeypatch):
    rec = Recorder(pool, monkeypatch)
    sched = Scheduler(pool, max_batch_rows=64, max_wait_ms=0)
    rows = [{"adapter": CLASS[i % len(CLASS)], "sentence": SENTENCES[i % 4]} for i in range(12)]
    jobs = [submit(sched, [r]) for r in rows]  # twelve one-row requests queued before the thread runs
    sched.start()
    wait(*(e for _, e, _ in jobs))
    sched.stop()
    assert rec.batches[0] == [pool.index(r["adapter"]) for r in rows]  # one forward, every request's row
    want = pool.predict(rows)
    assert [got["results"][0].text for _, _, got in jobs] == want


def test_max_batch_rows_bounds_every_forward(pool, monkeypatch):
    rec = Recorder(pool, monkeypatch)
    sched = Scheduler(pool, max_batch_rows=3, max_wait_ms=0)
    jobs = [submit(sched, [{"adapter": "lin", "sentence": s}]) for s in SENTENCES * 2]
    sched.start()
    wait(*(e for _, e, _ in jobs))
    sched.stop()
    assert [len(b) for b in rec.batches] == [3, 3, 2]


def test_max_wait_ms_gathers_rows_that_arrive_within_it(pool, monkeypatch):
    rec = Recorder(pool, monkeypatch)
    for wait_ms, want in ((2000, [3]), (0, [1, 1, 1])):
        rec.batches.clear()
        sched = Scheduler(pool, max_batch_rows=3, max_wait_ms=wait_ms).start()
        events = []
        for s in SENTENCES[:3]:
            events.append(submit(sched, [{"adapter": "lin", "sentence": s}])[1])
            if wait_ms == 0:
                wait(events[-1])  # nothing waits: each row is its own forward
            else:
                time.sleep(0.05)
        wait(*events)
        sched.stop()
        assert [len(b) for b in rec.batches] == want, wait_ms


def test_a_big_request_shares_batches_round_robin_with_small_ones(pool, monkeypatch):
    rec = Recorder(pool, monkeypatch)
    sched = Scheduler(pool, max_batch_rows=4, max_wait_ms=0)
    big = submit(sched, [{"adapter": "v2", "sentence": s} for s in SENTENCES * 3])  # 12 rows, first in line
    small = [submit(sched, [{"adapter": "lin", "sentence": s}]) for s in SENTENCES[:3]]
    sched.start()
    wait(big[1], *(e for _, e, _ in small))
    sched.stop()
    lin, v2 = pool.index("lin"), pool.index("v2")
    assert rec.batches[0] == [v2, lin, lin, lin]  # each small request's row in the first forward
    assert [len(b) for b in rec.batches] == [4, 4, 4, 3]
    assert [r.text for r in big[2]["results"]] == pool.predict(big[0].rows)  # in its own row order


def test_generation_rows_join_a_running_batch_and_decode_as_alone(pool, monkeypatch):
    rec = Recorder(pool, monkeypatch)
    sched = Scheduler(pool, max_batch_rows=8, max_wait_ms=0)
    rec.watch(sched, monkeypatch)
    sched.start()
    rows = [{"adapter": name, "mr": mr} for mr in MRS for name in ("gen_prompt", "gen_prefix")]
    jobs = []
    for r in rows:
        jobs.append(submit(sched, [r]))
        time.sleep(0.01)
    mixed_request = submit(sched, [rows[0], {"adapter": "lin", "sentence": "wow"}, rows[3]])  # kinds mixed, in order
    wait(*(e for _, e, _ in jobs), mixed_request[1])
    sched.stop()
    alone = [pool.generate([r])[0] for r in rows]
    assert [got["results"][0].text for _, _, got in jobs] == alone
    assert [r.text for r in mixed_request[2]["results"]] == [alone[0], pool.predict([mixed_request[0].rows[1]])[0],
                                                             alone[3]]
    assert any(running for _, running in rec.joins)  # some rows joined while others were decoding


def test_text_deltas_add_up_and_a_stop_string_ends_the_row(pool):
    row = {"adapter": "gen_prefix", "mr": MRS[0]}
    full = pool.generate([row])[0]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    sched = Scheduler(pool, max_batch_rows=4, max_wait_ms=0).start()
    pieces = []
    job, event, got = submit(sched, [row], on_text=lambda i, d: pieces.append(d))
    job2, event2, got2 = submit(sched, [row], stop=(stop,))
    job3, event3, got3 = submit(sched, [row], max_tokens=2)
    wait(event, event2, event3)
    sched.stop()
    assert "".join(pieces) == got["results"][0].text == full and len(pieces) > 1
    assert got2["results"][0].text == full[:full.index(stop)].strip() and got2["results"][0].finish == "stop"
    assert got3["results"][0].completion_tokens == 2 and got3["results"][0].finish == "length"


def test_a_cancelled_request_leaves_the_decoding_batch(pool):
    sched = Scheduler(pool, max_batch_rows=4, max_wait_ms=0)
    answered = []
    job = sched.submit(Job([{"adapter": "gen_prompt", "mr": MRS[0]}], lambda r, e: answered.append(r)))
    job.cancel()
    other, event, got = submit(sched, [{"adapter": "gen_prefix", "mr": MRS[1]}])
    sched.start()
    wait(event)
    sched.stop()
    assert not answered and not sched.decoder.rows and got["results"][0].text == pool.generate([other.rows[0]])[0]


def test_concurrent_http_clients_are_batched_together(pool, server):
    import http.client
    import json

    port = server.server_address[1]
    rows = [{"adapter": CLASS[i % len(CLASS)], "sentence": SENTENCES[i % 4]} for i in range(24)]
    answers = [None] * len(rows)

    def client(k):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for i in range(k, len(rows), 8):
            conn.request("POST", "/predict", json.dumps({"inputs": [rows[i]]}), {"Content-Type": "application/json"})
            answers[i] = json.loads(conn.getresponse().read())["outputs"][0]["prediction"]
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answers == pool.predict(rows)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    batches = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
               if line.startswith('ptune_batch_rows_') and 'kind="classify"' in line}
    n, total = batches['ptune_batch_rows_count{kind="classify"}'], batches['ptune_batch_rows_sum{kind="classify"}']
    assert total >= 24 and n < total  # fewer forwards than rows: requests of different clients shared them
    for name in ("ptune_queue_rows", "ptune_decoding_rows", "ptune_request_seconds_bucket", 'ptune_rows_total{adapter="lin"}',
                 'ptune_requests_total{endpoint="/predict",status="200"}'):
        assert name in text, name


def test_the_openai_client_works_unchanged(pool, server):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == pool.names
    row = {"adapter": "gen_prefix", "mr": MRS[0]}
    done = client.completions.create(model="gen_prefix", prompt=MRS[0])
    assert done.choices[0].text == pool.generate([row])[0] and done.usage.completion_tokens > 0
    several = client.completions.create(model="gen_prompt", prompt=MRS, max_tokens=3)
    assert [c.index for c in several.choices] == [0, 1, 2] and {c.finish_reason for c in several.choices} <= {"stop", "length"}
    stream = client.completions.create(model="gen_prefix", prompt=MRS[0], stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == done.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    label = client.completions.create(model="lin", prompt="wow")
    assert label.choices[0].text == pool.predict([{"adapter": "lin", "sentence": "wow"}])[0]
    with pytest.raises(openai.BadRequestError, match="temperature=0.7 is not served"):
        client.completions.create(model="lin", prompt="wow", temperature=0.7)
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' is not served"):
        client.completions.create(model="gpt-4", prompt="wow")
    with pytest.raises(openai.BadRequestError, match="max_tokens=17 is invalid"):
        client.completions.create(model="gen_prefix", prompt="x", max_tokens=17)


def test_seq2seq_requests_are_answered_whole_by_the_pool(data_dir):
    t5 = build_pool("tiny-t5", {"lin": CAUSAL["lin"], "gen": CAUSAL["gen_prefix"]})
    sched = Scheduler(t5, max_batch_rows=4, max_wait_ms=0)
    assert sched.decoder is None
    rows = [{"adapter": "gen", "mr": MRS[0]}, {"adapter": "lin", "sentence": "wow"}]
    jobs = [submit(sched, rows), submit(sched, rows[::-1])]
    sched.start()
    wait(*(e for _, e, _ in jobs))
    sched.stop()
    want = t5.predict(rows)
    assert [r.text for r in jobs[0][2]["results"]] == want and [r.text for r in jobs[1][2]["results"]] == want[::-1]


def test_a_failing_row_fails_its_request_only(pool, monkeypatch):
    real = pool.encode

    def encode(rows):
        if any(r.get("sentence") == "boom" for r in rows):
            raise RuntimeError("tokenizer exploded")
        return real(rows)

    monkeypatch.setattr(pool, "encode", encode)
    sched = Scheduler(pool, max_batch_rows=4, max_wait_ms=0)
    bad = submit(sched, [{"adapter": "lin", "sentence": "boom"}])
    good = submit(sched, [{"adapter": "lin", "sentence": "wow"}])
    sched.start()
    wait(bad[1], good[1])
    sched.stop()
    assert "exploded" in str(bad[2]["error"]) and good[2]["results"][0].text in ("negative", "positive")


def test_a_beam_search_run_is_served_with_its_beams(data_dir):
    specs = {"beam": [*CAUSAL["gen_prefix"], "task.decoding=beam", "task.num_beams=3"], "greedy": CAUSAL["gen_prefix"]}
    pool = build_pool("tiny-llama", specs)
    with torch.no_grad():  # the same tensors: only the decoding differs
        for p, q in zip(pool.adapters["beam"].method.parameters(), pool.adapters["greedy"].method.parameters()):
            p.copy_(q)
    rows = [{"adapter": "beam", "mr": mr} for mr in MRS] + [{"adapter": "greedy", "mr": MRS[0]}]
    sched = Scheduler(pool, max_batch_rows=4, max_wait_ms=0)
    job = submit(sched, rows)
    sched.start()
    wait(job[1])
    sched.stop()
    method, task = pool.alone("beam")
    want = task.predict(method, [{"mr": mr} for mr in MRS], 4)
    assert [r.text for r in job[2]["results"]] == want + [pool.generate([rows[-1]])[0]]
    assert pool.predict(rows) == want + [pool.generate([rows[-1]])[0]]
    assert want != [pool.generate([{"adapter": "greedy", "mr": mr}])[0] for mr in MRS]  # beams decode otherwise


def test_a_failing_decoding_step_fails_the_rows_in_it_and_the_thread_goes_on(pool, monkeypatch):
    sched = Scheduler(pool, max_batch_rows=4, max_wait_ms=0)
    real, calls = sched.decoder.step, []

    def step():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real()

    monkeypatch.setattr(sched.decoder, "step", step)
    first = submit(sched, [{"adapter": "gen_prompt", "mr": MRS[0]}])
    sched.start()
    wait(first[1])
    later = submit(sched, [{"adapter": "gen_prefix", "mr": MRS[1]}])
    wait(later[1])
    sched.stop()
    assert "device lost" in str(first[2]["error"]) and not sched.decoder.rows
    assert later[2]["results"][0].text == pool.generate([later[0].rows[0]])[0]


def test_a_stream_whose_client_goes_away_leaves_the_decoding_batch(server, monkeypatch):
    import socket

    decoder = server.service.scheduler.decoder
    real = decoder.step

    def slow_step():
        time.sleep(0.1)
        return real()

    monkeypatch.setattr(decoder, "step", slow_step)
    body = b'{"model": "gen_prefix", "prompt": "name[X]", "max_tokens": 16, "stream": true}'
    with socket.create_connection(server.server_address, timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")  # the status line: decoding has begun
        time.sleep(0.15)
        assert decoder.rows  # still decoding when the client leaves
    deadline = time.monotonic() + 10
    while decoder.rows and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not decoder.rows  # left at a token boundary, well before its 16 tokens x 0.1 s


def test_openai_request_keys_each_do_what_they_say(pool, server):
    """stop, fields, stream_options and user: read and applied, or refused in one line (never accepted and ignored)."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="unused", max_retries=0)
    full = client.completions.create(model="gen_prefix", prompt=MRS[0]).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = client.completions.create(model="gen_prefix", prompt=MRS[0], stop=[stop]).choices[0]
    assert cut.text == full[:full.index(stop)].strip() and cut.finish_reason == "stop"
    by_fields = client.completions.create(model="lin", prompt=None, extra_body={"fields": {"sentence": "wow"}})
    assert by_fields.choices[0].text == pool.predict([{"adapter": "lin", "sentence": "wow"}])[0]
    with pytest.raises(openai.BadRequestError, match="stream_options applies to streamed answers"):
        client.completions.create(model="lin", prompt="wow", stream_options={"include_usage": True})
    with pytest.raises(openai.BadRequestError, match="user='me' is not served"):
        client.completions.create(model="lin", prompt="wow", user="me")
