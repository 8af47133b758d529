"""Rows of different requests in the same forwards: the scheduler behind `ptune serve`.

    sched = Scheduler(pool, max_batch_rows=32, max_wait_ms=5)
    sched.start()
    job = sched.submit(rows, done=lambda results, error: ...)         # any thread; returns at once
    sched.stop()                                                      # after the jobs in hand are answered

One thread owns the model (and the tokenizer: fast tokenizers are not safe to share between threads).
Requests (`Job`s) queue their rows; each turn of the thread's loop:

1. **waits** until a row is queued; while nothing is decoding and fewer than `max_batch_rows` rows are
   queued, it waits up to `max_wait_ms` after the oldest queued row for more rows to arrive;
2. **classification**: takes up to `max_batch_rows` classification rows and runs them as ONE mixed
   forward (`Pool.class_scores` of the encoded rows: any mix of adapters, heads and methods);
3. **beam search** (runs with task.decoding=beam): up to `max_batch_rows` of their rows, decoded by each
   run's own task, adapter by adapter (a beam is not a row of the decoding batch);
4. **generation**: the running decoder (`ptune.infer.continuous.Decoder`) takes as many queued
   generation rows as it has free places (`max_batch_rows` rows decode at once), prefills them, and
   every running row gets one token; rows that end leave the batch at that token.

Fair scheduling: rows are taken **round-robin over the queued requests, oldest request first, one row
per request per turn** (for each kind), so a request of 64 rows shares every batch with the one-row
requests that arrived after it instead of going first whole; a long generation occupies one place of
the decoding batch and never blocks the rows behind it. Every request's answers come back in its own
row order (each row keeps its index).

Seq2seq backbones (T5, BART) do not mix adapters (`ptune.infer.mixed`): their requests are taken whole,
in arrival order, and answered by `Pool.predict` (one forward per adapter in the request).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ptune.errors import PtuneError
from ptune.generate import newline_ids
from ptune.infer import mixed
from ptune.infer.continuous import Decoder, Row

log = logging.getLogger("ptune.serve")


@dataclass
class Result:
    """One row's answer: a label or generated line, why it ended ("stop", "length"; classification "stop"),
    and the tokens it read and generated."""

    text: str
    finish: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Job:
    """One request: its rows (already checked by Pool.check), and what to call from the model thread.

    on_text(i, delta): generation rows' text as it grows (the deltas add up to Result.text);
    max_tokens: a cap on every generation row's new tokens (None: the adapter's task.max_new_tokens);
    stop: strings that end a generated row where they first appear (not included), as OpenAI's `stop`;
    done(results, error): once, with every row's Result in order, or the exception that failed the job.
    """

    rows: list[dict]
    done: Callable[[list | None, BaseException | None], None]
    on_text: Callable[[int, str], None] | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    arrived: float = field(default_factory=time.monotonic)
    results: list = field(init=False)
    left: int = field(init=False)
    failed: bool = field(init=False, default=False)
    cancelled: bool = field(init=False, default=False)
    queued: int = field(init=False)
    cls_rows: deque = field(init=False, default_factory=deque)
    gen_rows: deque = field(init=False, default_factory=deque)
    beam_rows: deque = field(init=False, default_factory=deque)
    running: list = field(init=False, default_factory=list)

    def __post_init__(self):
        self.results = [None] * len(self.rows)
        self.left = self.queued = len(self.rows)

    def cancel(self) -> None:
        """The client is gone: its queued rows are dropped and its running rows leave at the next token."""
        self.cancelled = True
        for row in list(self.running):
            row.cancel()


class Scheduler:
    """The model thread (module docstring). `metrics`: a ptune.infer.serve_metrics.Metrics or None."""

    def __init__(self, pool, max_batch_rows: int = 32, max_wait_ms: float = 5.0, metrics=None):
        if int(max_batch_rows) < 1:
            raise PtuneError(f"max_batch_rows={max_batch_rows} is invalid: at least 1 row per forward")
        if float(max_wait_ms) < 0:
            raise PtuneError(f"max_wait_ms={max_wait_ms} is invalid: 0 or more milliseconds")
        self.pool = pool
        self.max_batch_rows = int(max_batch_rows)
        self.max_wait = float(max_wait_ms) / 1000
        self.metrics = metrics
        self.mixes = pool.backbone.kind in mixed.MIXED_KINDS
        tok = pool.backbone.tokenizer
        self.decoder = None
        if self.mixes and pool.backbone.kind == "causal":
            self.decoder = Decoder(pool._methods, [tok.eos_token_id] + newline_ids(tok), tok.pad_token_id)
        self._jobs: deque[Job] = deque()  # queued, oldest first
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="ptune-model", daemon=True)

    # -- any thread --------------------------------------------------------------------------------
    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def submit(self, job: Job) -> Job:
        with self._cv:
            if self._stopping:
                raise PtuneError("the server is stopping; send the request again to another replica")
            self._jobs.append(job)
            if self.metrics:
                self.metrics.queued(len(job.rows))
            self._cv.notify()
        return job

    def stop(self, timeout: float | None = None) -> None:
        """Answer every job in hand, then end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.ident is not None:
            self._thread.join(timeout)

    # -- the model thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._decoding():
                    if self._stopping:
                        return
                    self._cv.wait()
                self._wait_for_more()
                take = self._take_jobs() if not self.mixes else None
            try:
                if take is not None:
                    self._whole(take)
                else:
                    self._turn()
            except Exception as e:  # noqa: BLE001 -- the model thread never dies with a request
                log.error("batch failed:\n%s", traceback.format_exc())
                self._fail_all_running(e)

    def _decoding(self) -> bool:
        return bool(self.decoder and self.decoder.rows)

    def _wait_for_more(self) -> None:
        """Under the lock: up to max_wait after the oldest queued row, unless a batch is full or decoding."""
        if self._decoding() or not self._jobs:
            return
        deadline = self._jobs[0].arrived + self.max_wait
        while not self._stopping and sum(j.queued for j in self._jobs) < self.max_batch_rows:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cv.wait(left)

    def _take_jobs(self) -> list[Job]:
        jobs = list(self._jobs)
        self._jobs.clear()
        return jobs

    def _whole(self, jobs: list[Job]) -> None:
        """Seq2seq backbones: each request whole through Pool.predict."""
        for job in jobs:
            self._dequeued(job, job.queued)
            if job.cancelled:
                continue
            try:
                texts = self.pool.predict(job.rows, self.max_batch_rows)
                self._observe("request", [self._adapter_name(r) for r in job.rows])
                job.done([Result(t) for t in texts], None)
            except Exception as e:  # noqa: BLE001
                job.done(None, e)

    def _turn(self) -> None:
        with self._cv:
            for job in list(self._jobs):
                if job.cancelled or job.failed:
                    self._drop(job)
                elif job.queued == job.left == len(job.rows) and not (job.cls_rows or job.gen_rows or job.beam_rows):
                    self._admit(job)  # first turn: encode its rows (tokenizer: this thread only)
            cls_take = self._round_robin("cls_rows", self.max_batch_rows)
            beam_take = self._round_robin("beam_rows", self.max_batch_rows)
            free = self.max_batch_rows - (len(self.decoder.rows) if self.decoder else 0)
            gen_take = self._round_robin("gen_rows", free) if self.decoder else []
        if cls_take:
            self._classify(cls_take)
        if beam_take:
            self._beams(beam_take)
        if gen_take:
            self._join(gen_take)
        elif self._decoding():
            self._observe("decode", [None] * len(self.decoder.rows))
            self.decoder.step()
        if self.metrics and self.decoder:
            self.metrics.running(len(self.decoder.rows))

    def _admit(self, job: Job) -> None:
        try:
            encoded = self.pool.encode(job.rows)
        except Exception as e:  # noqa: BLE001 -- a row the tokenizer or task refuses fails its request only
            self._fail(job, e)
            return
        for i, e in enumerate(encoded):
            if self.pool.adapters[self.pool.names[e["adapter"]]].decodes_alone:
                job.beam_rows.append((i, e))
            elif self.pool._served(e) == "text":
                job.gen_rows.append((i, e))
            else:
                job.cls_rows.append((i, e))

    def _round_robin(self, kind: str, limit: int) -> list[tuple[Job, int, dict]]:
        """Up to `limit` rows of `kind`, one per queued request per round, oldest request first."""
        taken: list = []
        while len(taken) < limit:
            before = len(taken)
            for job in self._jobs:
                queue = getattr(job, kind)
                if queue and len(taken) < limit:
                    i, e = queue.popleft()
                    taken.append((job, i, e))
            if len(taken) == before:
                break
        for job, _, _ in taken:
            self._dequeued(job, 1)
        return taken

    def _dequeued(self, job: Job, n: int) -> None:
        job.queued -= n
        if self.metrics and n:
            self.metrics.queued(-n)

    def _adapter_name(self, row: dict) -> str:
        return row.get("adapter", self.pool.names[0])

    def _classify(self, taken: list[tuple[Job, int, dict]]) -> None:
        try:
            scores = self.pool._class_scores([e for _, _, e in taken])
        except Exception as e:  # noqa: BLE001
            for job in {id(j): j for j, _, _ in taken}.values():
                self._fail(job, e)
            return
        self._observe("classify", [self.pool.names[e["adapter"]] for _, _, e in taken])
        for (job, i, e), s in zip(taken, scores):
            labels = self.pool.adapters[self.pool.names[e["adapter"]]].task.labels
            self._answer(job, i, Result(labels[int(s.argmax())], "stop", len(e["ids"]), 0))

    def _beams(self, taken: list[tuple[Job, int, dict]]) -> None:
        """Rows of beam-search adapters: decoded by their own task, adapter by adapter (Pool.decode_alone)."""
        rows = [job.rows[i] for job, i, _ in taken]
        try:
            texts = self.pool.decode_alone(rows, list(range(len(rows))), self.max_batch_rows)
        except Exception as e:  # noqa: BLE001
            for job in {id(j): j for j, _, _ in taken}.values():
                self._fail(job, e)
            return
        self._observe("beam", [self.pool.names[e["adapter"]] for _, _, e in taken])
        tok = self.pool.backbone.tokenizer
        for k, (job, i, e) in enumerate(taken):
            text = texts[k]
            if job.stop:
                cut = [text.index(s) for s in job.stop if s in text]
                text = text[:min(cut)].strip() if cut else text
            self._answer(job, i, Result(text, "stop", len(e["ids"]), len(tok(text, add_special_tokens=False)["input_ids"])))

    def _join(self, taken: list[tuple[Job, int, dict]]) -> None:
        rows = []
        for job, i, e in taken:
            task = self.pool.adapters[self.pool.names[e["adapter"]]].task
            limit = job.max_tokens if job.max_tokens is not None else task.max_new_tokens
            stream = _TextStream(self.pool.backbone.tokenizer, job, i, e, limit, self)
            rows.append(stream.row)
            job.running.append(stream.row)
        self._observe("prefill", [self.pool.names[e["adapter"]] for _, _, e in taken])
        self.decoder.join(rows)

    def _observe(self, kind: str, adapters: list) -> None:
        """One forward of `kind` over len(adapters) rows; new rows (not decode steps) count per adapter."""
        if self.metrics:
            self.metrics.batch(kind, len(adapters), [a for a in adapters if a is not None])

    def _answer(self, job: Job, i: int, result: Result) -> None:
        if job.failed:
            return
        job.results[i] = result
        job.left -= 1
        if job.left == 0:
            with self._cv:
                if job in self._jobs:
                    self._jobs.remove(job)
            job.done(job.results, None)

    def _fail(self, job: Job, error: BaseException) -> None:
        if job.failed:
            return
        job.failed = True
        job.cancel()
        with self._cv:
            self._drop(job)
        job.done(None, error)

    def _drop(self, job: Job) -> None:
        """Under the lock: forget a cancelled or failed job's queued rows (its running rows leave at the next token)."""
        self._dequeued(job, job.queued)
        job.cls_rows.clear()
        job.gen_rows.clear()
        job.beam_rows.clear()
        if job in self._jobs and not job.running:
            self._jobs.remove(job)

    def _fail_all_running(self, error: BaseException) -> None:
        """A decoding step raised: the jobs with rows in the batch fail with its one line; the decoder starts empty."""
        with self._cv:
            running = [j for j in self._jobs if j.running]
        for job in running:
            self._fail(job, error)
        if self.decoder:
            self.decoder.cancel_all()


class _TextStream:
    """A generation row's text as the tokens arrive: Pool's rule (decode, first line, stripped), cut at the
    request's first stop string; deltas hold back what may still change (trailing spaces, a partial
    character, a partial stop string) so they always add up to the final text."""

    def __init__(self, tok, job: Job, index: int, encoded: dict, limit: int, sched: Scheduler):
        self.tok, self.job, self.index, self.sched = tok, job, index, sched
        self.sent = ""
        self.stopped = False
        self.hold = max((len(s) for s in job.stop), default=1) - 1
        self.prompt_tokens = len(encoded["ids"])
        self.row = Row(encoded["adapter"], encoded["ids"], limit, on_token=self.token, on_done=self.done)

    def _text(self) -> tuple[str, bool]:
        text = self.tok.decode(self.row.tokens, skip_special_tokens=True).split("\n")[0].lstrip()
        cut = [text.index(s) for s in self.job.stop if s and s in text]
        return (text[:min(cut)], True) if cut else (text, False)

    def token(self, _token_id: int) -> None:
        if self.sched.metrics:
            self.sched.metrics.tokens(self.sched.pool.names[self.row.adapter], 1)
        text, stopped = self._text()
        if stopped:  # a stop string: the row leaves at this token boundary
            self.stopped = True
            self.row.cancel()
            return
        if self.job.on_text is None:
            return
        visible = text.rstrip()
        if visible.endswith("\ufffd"):
            visible = visible[:-1]
        visible = visible[:max(len(self.sent), len(visible) - self.hold)] if self.hold else visible
        if visible.startswith(self.sent) and len(visible) > len(self.sent):
            self.job.on_text(self.index, visible[len(self.sent):])
            self.sent = visible

    def done(self, reason: str) -> None:
        job = self.job
        if self.row in job.running:
            job.running.remove(self.row)
        if job.cancelled or job.failed:
            if not job.running:
                with self.sched._cv:
                    self.sched._drop(job)
            return
        text, _ = self._text()
        text = text.strip()
        if job.on_text is not None and text.startswith(self.sent) and len(text) > len(self.sent):
            job.on_text(self.index, text[len(self.sent):])
        finish = "stop" if self.stopped or reason == "stop" else "length"
        self.sched._answer(job, self.index, Result(text, finish, self.prompt_tokens, len(self.row.tokens)))
