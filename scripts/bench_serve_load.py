"""Cross-request batching in `ptune serve`: rows/s and latency of many one-row clients, old server vs new.

    python scripts/bench_serve_load.py [--sections cls,peft,adapters,model,gen] [--quick] [--cls-run <dir>] [--gen-run <dir>]
        [--old-commit 57d42ca] [--max-batch-rows 16] [--max-wait-ms 5] [--new-extra 'max_batch_rows={N} max_wait_ms={M}']
        [--rows N] [--gen-rows N] [--adapter-counts 8,64,512] [--out bench/serve-batching-<date>]

Every server is a separate `python -m ptune serve run=a0:<dir>,a1:<dir>,... port=0` process on localhost
(aliases of one run directory), ready when it prints its URL (up to 600 s). "old" runs the code of
--old-commit from a temporary `git worktree` (PYTHONPATH and cwd = the worktree, removed at the end); "new"
runs this checkout with --new-extra, measured first, so a new server that refuses those keys stops the
bench at once. Clients are threads of this process; each is bound to one adapter (client k: a{k % 8}),
sends one row per request, POST /predict {"inputs": [{"adapter": ..., "sentence": ...}]}, and reuses one
http.client.HTTPConnection (kept alive when the server's responses allow it: the "kept alive" column).

  cls       SST-2 prompt-tuning run, 16 clients over 8 adapters: old server, new server, and the
            "ceiling": one client sending the same rows as 16-row mixed-adapter requests to the new server.
  peft      the same 16 clients' rows through Hugging Face PEFT in this process: the run's backbone
            wrapped in PromptTuningConfig with adapters a0..a7 (randomly initialized: throughput only),
            one worker thread serving a queue row by row in arrival order, set_adapter before each
            forward (PEFT's model is one shared object); prediction = argmax of the last token's logits.
  adapters  the new server with 8, 64, 512 aliases of the SST-2 run, 16 clients spread over all of
            them: rows/s, latency, server RSS after the load, MB per adapter beyond 8.
  model     no HTTP: the SST-2 run's rows through Pool.predict in this process, one row per forward against
            16 rows per forward (torch threads as the server's): what batching can gain on this machine at all.
  gen       E2E prefix-tuning run, 8 clients (one adapter each) sending one MR per request, old vs
            new server: rows/s, latency, generated tokens/s (the run's own tokenizer).

Without --cls-run/--gen-run it trains the runs first (`python -m ptune train`): --quick uses tiny-llama
and 2 steps with small row counts (a few minutes on 2 cores); otherwise SmolLM2-135M, 20 steps.
Clients, servers and the PEFT baseline share this machine's cores, and the header says so.
Writes <out>.md and <out>.json and prints the md.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("PTUNE_DATA_DIR", ROOT.parent / "shared" / "data"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PTUNE_DATA_DIR": str(DATA)}
FALLBACK_SST2 = ["a gorgeous, witty, seductive movie", "dull and overlong", "the acting is superb", "a waste of two hours"]
FALLBACK_MR = ["name[The Eagle], eatType[coffee shop], food[French], area[riverside]", "name[Alimentum], area[city centre]"]
ADAPTERS, CLIENTS, GEN_CLIENTS, START_S = 8, 16, 8, 600


def sst2_sentences() -> list[str]:
    path = DATA / "sst2" / "dev.tsv"
    if not path.exists():
        return FALLBACK_SST2
    with path.open() as f:
        return [r["sentence"].strip() for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def e2e_mrs() -> list[str]:
    path = DATA / "e2e" / "dev.csv"
    if not path.exists():
        return FALLBACK_MR
    with path.open(newline="") as f:
        return list(dict.fromkeys(r["mr"] for r in csv.DictReader(f)))


def train(out: Path, task: str, quick: bool) -> tuple[Path, str]:
    """A fresh run in `out` and the command that trained it."""
    steps = 2 if quick else 20
    keys = [f"model={'tiny-llama' if quick else 'smollm2-135m'}", f"task={task}",
            *(["method=prompt", "method.num_virtual_tokens=10"] if task == "sst2" else ["method=prefix"]),
            f"task.max_train_samples={16 if quick else 64}", f"task.max_eval_samples={4 if quick else 8}",
            "trainer.batch_size=4", f"trainer.max_steps={steps}", f"trainer.eval_every={steps}",
            f"trainer.save_every={steps}", f"output_dir={out}"]
    p = subprocess.run([sys.executable, "-m", "ptune", "train", *keys], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       check=False)
    if p.returncode:
        raise SystemExit(f"ptune train {' '.join(keys)} failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    return next(out.rglob("config.yaml")).parent, "ptune train " + " ".join(keys[:-1])


class Server:
    """`python -m ptune serve` as a process: started in __init__ (ready when it prints its URL), stopped on exit."""

    def __init__(self, label: str, run: Path, k: int, extra: list[str], code: Path | None, log: Path):
        cmd = [sys.executable, "-m", "ptune", "serve", "run=" + ",".join(f"a{i}:{run}" for i in range(k)),
                    "port=0", *extra]
        self.shown = f"python -m ptune serve run=a0:<run>,...,a{k - 1}:<run> port=0 {' '.join(extra)}".strip()
        self.log = log.open("w+")
        env = {**ENV, "PYTHONPATH": str(code)} if code else ENV
        self.proc = subprocess.Popen(cmd, cwd=code or ROOT, env=env, stdout=subprocess.PIPE, stderr=self.log, text=True)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [*map(lines.put, self.proc.stdout), lines.put("")], daemon=True).start()
        deadline = time.monotonic() + START_S
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise SystemExit(f"{label} server: no ready line within {START_S} s ({self.shown})") from None
            if "http://127.0.0.1:" in line:
                self.port = int(line.split("http://127.0.0.1:")[1].split()[0].rstrip("/"))
                return
            if line == "":  # stdout closed: the process is gone
                self.proc.wait()
                self.log.seek(0)
                err = [s for s in self.log.read().splitlines() if s.strip()] or ["(no output)"]
                self.log.close()
                raise ServerFailed(f"{label} server exited {self.proc.returncode} before it was ready "
                                   f"({self.shown}): {err[-1]}")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
        return float("nan")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class ServerFailed(SystemExit):
    """A server process that exited before its ready line."""


def post(conn: http.client.HTTPConnection, rows: list[dict]) -> tuple[int, dict, bool]:
    """(status, payload, kept alive) of one POST /predict; a connection the server closed is reopened once."""
    body = json.dumps({"inputs": rows})
    for _ in range(2):
        try:
            conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"{}"), not resp.will_close
        except (http.client.HTTPException, OSError):
            conn.close()
    return 0, {}, False


def summarize(latencies: list[float], wall: float, rows: int, statuses: dict, kept: list[bool]) -> dict:
    lat = sorted(latencies)
    pct = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1)
    return {"requests": len(lat), "rows": rows, "wall_s": round(wall, 2), "rows_per_s": round(rows / wall, 1),
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "kept_alive": f"{sum(kept)}/{len(kept)}" if kept else "n/a"}


def drive(per_client: list[list[list[dict]]], send) -> tuple[dict, list[dict]]:
    """One thread per client, client k sending its requests in order through send(k, rows) -> (status, payload, kept)."""
    latencies, kept, payloads, statuses = [], [], [], {}
    lock = threading.Lock()

    def client(k, requests):
        for rows in requests:
            t0 = time.perf_counter()
            status, payload, alive = send(k, rows)
            with lock:
                latencies.append(time.perf_counter() - t0)
                kept.append(alive)
                payloads.append(payload)
                statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=client, args=(k, reqs)) for k, reqs in enumerate(per_client)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = sum(len(r) for reqs in per_client for r in reqs)
    return summarize(latencies, time.perf_counter() - t0, rows, statuses, kept), payloads


def http_load(port: int, per_client: list[list[list[dict]]], warm: int = CLIENTS) -> tuple[dict, list[dict]]:
    """The requests over HTTP, after an untimed warm-up of one request from each of the first `warm` clients."""
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=START_S) for _ in per_client]
    try:
        drive([reqs[:1] for reqs in per_client[:warm]], lambda k, rows: post(conns[k], rows))
        return drive(per_client, lambda k, rows: post(conns[k], rows))
    finally:
        for conn in conns:
            conn.close()


def one_row_clients(rows: list[dict], clients: int) -> list[list[list[dict]]]:
    """Row i goes to client i % clients as a one-row request."""
    return [[[r] for r in rows[k::clients]] for k in range(clients)]


def peft_load(run: Path, per_client: list[list[list[dict]]]) -> dict:
    """The same requests through PEFT prompt tuning in this process: one model, one worker thread."""
    import warnings

    import torch
    from peft import PromptTuningConfig, TaskType, get_peft_model

    from ptune.build import build_backbone, load_run

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations inside PEFT
    _, cfg = load_run(run)
    backbone = build_backbone(cfg)
    config = lambda: PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=int(cfg.method.num_virtual_tokens))
    model = get_peft_model(backbone.model, config(), adapter_name="a0")
    for i in range(1, ADAPTERS):
        model.add_adapter(f"a{i}", config())
    model.eval()
    jobs: queue.Queue = queue.Queue()

    def worker():
        while (job := jobs.get()) is not None:
            row, answer = job
            try:
                model.set_adapter(row["adapter"])
                with torch.no_grad():
                    logits = model(**backbone.tokenizer(row["sentence"], return_tensors="pt")).logits
                answer.put((200, {"prediction": int(logits[0, -1].argmax())}, False))
            except Exception as e:  # noqa: BLE001 -- counted as a failed row, the clients go on
                answer.put((500, {"error": repr(e)}, False))

    def send(k, rows):
        answer: queue.Queue = queue.Queue()
        jobs.put((rows[0], answer))
        return answer.get()

    serving = threading.Thread(target=worker)
    serving.start()
    try:
        drive([reqs[:1] for reqs in per_client], send)  # warm-up
        stats, _ = drive(per_client, send)
    finally:
        jobs.put(None)
        serving.join()
    stats["kept_alive"] = "n/a"
    return stats


def model_bound(run: Path, rows: list[dict]) -> dict:
    """Pool.predict of the same rows one per forward and 16 per forward, in this process (no HTTP)."""
    from ptune.infer.pool import Pool

    pool = Pool.load({f"a{i}": str(run) for i in range(ADAPTERS)})
    pool.predict(rows[:CLIENTS], CLIENTS)  # warm-up
    out = {"rows": len(rows)}
    for label, size in (("one_row", 1), ("batched", CLIENTS)):
        t0 = time.perf_counter()
        for i in range(0, len(rows), size):
            pool.predict(rows[i:i + size], size)
        out[f"{label}_ms_per_row"] = round((time.perf_counter() - t0) * 1000 / len(rows), 1)
    out["gain"] = round(out["one_row_ms_per_row"] / out["batched_ms_per_row"], 2)
    out["adapter_file_kb"] = round((run / "adapter" / "adapter_model.safetensors").stat().st_size / 1024, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="cls,peft,adapters,model,gen", help="any of cls,peft,adapters,model,gen")
    ap.add_argument("--quick", action="store_true", help="tiny-llama runs and small counts (validation)")
    ap.add_argument("--cls-run", help="an SST-2 prompt-tuning run directory (default: train one)")
    ap.add_argument("--gen-run", help="an E2E prefix-tuning run directory (default: train one)")
    ap.add_argument("--old-commit", default="57d42ca")
    ap.add_argument("--max-batch-rows", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5)
    ap.add_argument("--new-extra", default="max_batch_rows={N} max_wait_ms={M}",
                    help="keys for the new server ({N}, {M}: the two flags above); '' = none")
    ap.add_argument("--rows", type=int, help="rows per cls/peft/adapters measurement (default 960; --quick 96)")
    ap.add_argument("--gen-rows", type=int, help="rows per gen measurement (default 64; --quick 16)")
    ap.add_argument("--adapter-counts", default="8,64,512")
    ap.add_argument("--out", default=f"bench/serve-batching-{time.strftime('%Y-%m-%d')}")
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if unknown := set(sections) - {"cls", "peft", "adapters", "model", "gen"}:
        ap.error(f"unknown sections {sorted(unknown)}; choose from cls,peft,adapters,model,gen")
    n_rows = args.rows or (96 if args.quick else 960)
    n_gen = args.gen_rows or (16 if args.quick else 64)
    new_extra = args.new_extra.format(N=args.max_batch_rows, M=f"{args.max_wait_ms:g}").split()
    sst2, mrs = sst2_sentences(), e2e_mrs()
    cls_rows = [{"adapter": f"a{i % ADAPTERS}", "sentence": sst2[i % len(sst2)]} for i in range(n_rows)]
    gen_rows = [{"adapter": f"a{i % ADAPTERS}", "mr": mrs[i % len(mrs)]} for i in range(n_gen)]
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} cores, {platform.platform()}, "
                    f"python {platform.python_version()}", "load_average": round(os.getloadavg()[0], 2),
                    "command": "python scripts/bench_serve_load.py " + " ".join(sys.argv[1:] if argv is None else argv), "sections": sections,
                    "old_commit": args.old_commit, "new_extra": " ".join(new_extra), "servers": {}}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp_s:
        tmp = Path(tmp_s)
        need_cls, need_gen = bool({"cls", "peft", "adapters", "model"} & set(sections)), "gen" in sections
        result["runs"], runs = {}, {}
        for key, given, task, needed in (("cls", args.cls_run, "sst2", need_cls), ("gen", args.gen_run, "e2e", need_gen)):
            if given:
                runs[key], result["runs"][key] = Path(given), given
            elif needed:
                runs[key], how = train(tmp / key, task, args.quick)
                result["runs"][key] = f"`{how}` (trained here, in a temporary directory)"
        cls_run, gen_run = runs.get("cls"), runs.get("gen")
        old = tmp / "old"
        if {"cls", "gen"} & set(sections):
            p = subprocess.run(["git", "worktree", "add", "--detach", str(old), args.old_commit], cwd=ROOT,
                               capture_output=True, text=True, check=False)
            if p.returncode:
                raise SystemExit(f"git worktree add {old} {args.old_commit} failed: {p.stderr.strip()}")
        try:
            def server(label, run, k=ADAPTERS):
                code, extra = (old, []) if label.startswith("old") else (None, new_extra)
                try:
                    s = Server(label, run, k, extra, code, tmp / f"{label}.log")
                except ServerFailed as e:
                    hint = (f"; the new server does not take {' '.join(new_extra)!r}: until it does, run with --new-extra ''"
                            if extra else "")
                    raise SystemExit(f"{e}{hint}") from None
                result["servers"][label] = ("PYTHONPATH=<worktree of " + args.old_commit + "> " if code else "") + s.shown
                return s

            if "cls" in sections:
                cls = result["cls"] = {}
                with server("new", cls_run) as s:  # first: a new server that refuses its keys fails at once
                    cls["new"], _ = http_load(s.port, one_row_clients(cls_rows, CLIENTS))
                    chunks = [cls_rows[i:i + CLIENTS] for i in range(0, n_rows, CLIENTS)]
                    cls["ceiling"], _ = http_load(s.port, [chunks])
                with server("old", cls_run) as s:
                    cls["old"], _ = http_load(s.port, one_row_clients(cls_rows, CLIENTS))
                cls["new_over_old"] = round(cls["new"]["rows_per_s"] / cls["old"]["rows_per_s"], 2)
                cls["new_over_ceiling"] = round(cls["new"]["rows_per_s"] / cls["ceiling"]["rows_per_s"], 2)
            if "peft" in sections:
                result["peft"] = peft_load(cls_run, one_row_clients(cls_rows, CLIENTS))
                if "cls" in result:
                    result["cls"]["new_over_peft"] = round(result["cls"]["new"]["rows_per_s"] / result["peft"]["rows_per_s"], 2)
            if "adapters" in sections:
                result["adapters"] = []
                for k in [int(c) for c in args.adapter_counts.split(",")]:
                    rows = [{"adapter": f"a{i % k}", "sentence": sst2[i % len(sst2)]} for i in range(n_rows)]
                    with server(f"new-{k}", cls_run, k) as s:
                        idle = s.rss_mb()  # loaded, before any request
                        stats, _ = http_load(s.port, one_row_clients(rows, CLIENTS))
                        result["adapters"].append({"adapters": k, **stats, "rss_idle_mb": idle, "rss_mb": s.rss_mb()})
                base = result["adapters"][0]  # a count given twice (8,512,8: drift on a shared machine) is measured twice
                for a in result["adapters"][1:]:
                    if a["adapters"] != base["adapters"]:
                        a["mb_per_adapter"] = round((a["rss_mb"] - base["rss_mb"]) / (a["adapters"] - base["adapters"]), 3)
            if "model" in sections:
                result["model"] = model_bound(cls_run, cls_rows[:min(len(cls_rows), 64)])
            if "gen" in sections:
                from ptune.build import build_backbone, load_run

                tokenizer = build_backbone(load_run(gen_run)[1]).tokenizer
                result["gen"] = {}
                for label in ("new-gen", "old-gen"):
                    with server(label, gen_run) as s:
                        stats, payloads = http_load(s.port, one_row_clients(gen_rows, GEN_CLIENTS), warm=1)
                    texts = [o["prediction"] for p in payloads for o in p.get("outputs", [])]
                    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
                    result["gen"][label[:3]] = {**stats, "tokens": tokens, "tokens_per_s": round(tokens / stats["wall_s"], 1)}
                g = result["gen"]
                g["new_over_old"] = round(g["new"]["rows_per_s"] / g["old"]["rows_per_s"], 2)
        finally:
            if old.exists():
                subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, capture_output=True,
                               check=False)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = markdown(result, n_rows, n_gen)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def markdown(r: dict, n_rows: int, n_gen: int) -> list[str]:
    sep = "|---|---|---|---|---|---|---|---|"
    head = "| {} | rows/s | p50 ms | p99 ms | requests | rows | statuses | kept alive |"
    row = lambda name, s: (f"| {name} | {s['rows_per_s']} | {s['p50_ms']} | {s['p99_ms']} | {s['requests']} | "
                           f"{s['rows']} | {s['statuses']} | {s['kept_alive']} |")
    runs = r["runs"]
    lines = [f"# ptune serve: cross-request batching ({r['date']})", "", f"`{r['command']}`", "",
             (f"Machine: {r['machine']}; load average {r['load_average']} at the start. The client threads (this "
              "process), the server (a separate process, one at a time) and the PEFT baseline share these cores."), "",
             f"Runs (`<run>` below): classification {runs.get('cls', '-')}; generation {runs.get('gen', '-')}.", "",
             (f"Servers (`old*`: the code of commit {r['old_commit']} from a temporary git worktree; `new*`: this "
              "checkout); `a0..a{K-1}` are aliases of one run directory:"), ""]
    lines += [f"- {label}: `{cmd}`" for label, cmd in r["servers"].items()]
    lines += ["", ("Each client is a thread bound to one adapter (client k: a{k % 8}), sending one row per request "
                   "through one reused http.client connection (kept alive: responses that left it open; "
                   "otherwise it reconnects per request). p50/p99: per request; rows/s: rows / wall time.")]
    if "cls" in r or "peft" in r:
        lines += ["", f"## Classification: SST-2, {CLIENTS} clients over {ADAPTERS} adapters, {n_rows} rows", "",
                  head.format("setup"), sep]
    if "cls" in r:
        c = r["cls"]
        lines += [row("old server", c["old"]), row("new server (cross-request batching)", c["new"]),
                  row(f"ceiling: 1 client, {CLIENTS}-row mixed requests, new server", c["ceiling"])]
    if "peft" in r:
        lines.append(row("PEFT in the bench process (1 worker, set_adapter per row)", r["peft"]))
    if "cls" in r:
        lines += ["", f"rows/s: new/old {c['new_over_old']}x; new/ceiling {c['new_over_ceiling']}x"
                  + (f"; new/PEFT {c['new_over_peft']}x" if "new_over_peft" in c else "") + "."]
    if "adapters" in r:
        lines += ["", f"## Many adapters: new server, {CLIENTS} clients spread over all adapters, {n_rows} rows", "",
                  ("| adapters | rows/s | p50 ms | p99 ms | statuses | server RSS MB loaded, before requests | after the "
                   f"load | MB per adapter (RSS_K - RSS_{r['adapters'][0]['adapters']}) / (K - {r['adapters'][0]['adapters']}) "
                   "after the load |"), "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {a['adapters']} | {a['rows_per_s']} | {a['p50_ms']} | {a['p99_ms']} | {a['statuses']} | "
                  f"{a.get('rss_idle_mb', '-')} | {a['rss_mb']} | {a.get('mb_per_adapter', '-')} |" for a in r["adapters"]]
    if "model" in r:
        m = r["model"]
        lines += ["", "## The model alone: what batching can gain on this machine (Pool.predict in this process, no HTTP)",
                  "", "| rows | ms per row, one row per forward | ms per row, 16 rows per forward | gain |",
                  "|---|---|---|---|",
                  f"| {m['rows']} | {m['one_row_ms_per_row']} | {m['batched_ms_per_row']} | {m['gain']}x |", "",
                  f"One adapter file (adapter_model.safetensors): {m['adapter_file_kb']} KB."]
    if "gen" in r:
        g = r["gen"]
        lines += ["", (f"## Generation: E2E prefix tuning, {GEN_CLIENTS} clients over {ADAPTERS} adapters, {n_gen} "
                       "rows (tokens: the run's tokenizer on the returned text)"), "",
                  "| server | rows/s | p50 ms | p99 ms | statuses | tokens | tokens/s |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {k} | {s['rows_per_s']} | {s['p50_ms']} | {s['p99_ms']} | {s['statuses']} | {s['tokens']} | "
                  f"{s['tokens_per_s']} |" for k, s in (("old", g["old"]), ("new", g["new"]))]
        lines += ["", f"rows/s: new/old {g['new_over_old']}x."]
    return lines

if __name__ == "__main__":
    sys.exit(main())
