"""Load on `ptune serve` over a real socket on localhost: requests/s and latency percentiles with C
concurrent clients, and the server's memory across many requests.

    python scripts/bench_serve_load.py [--run <run dir>] [--clients 8,200] [--requests 2000]
                                       [--memory-requests 10000] [--out bench/serve-load-<date>]

Without --run it trains a tiny run first (tiny-llama, SST-2, prompt tuning, 2 steps), so the figures
measure the server (HTTP parsing, JSON, the lock, one small forward per request) rather than a big
model. Each client is a thread with its own keep-alive-less HTTP/1.1 connection per request
(http.client), sending POST /predict with one SST-2 row; a client loop is bounded by the request
count. The server runs as a separate `ptune serve` process; its RSS is read from /proc/<pid>/status
before, every 1,000 requests and after the memory run. Clients and server share this machine's cores:
the figures are for that setting, and say so in their header. Writes <out>.md and <out>.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROWS = ["a gorgeous, witty, seductive movie", "dull and overlong", "the acting is superb", "a waste of two hours"]


def tiny_run(tmp: Path) -> Path:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.setdefault("PTUNE_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    cmd = [sys.executable, "-m", "ptune", "train", "model=tiny-llama", "task=sst2", "method=prompt",
           "method.num_virtual_tokens=4", "task.max_train_samples=16", "task.max_eval_samples=4",
           "trainer.batch_size=4", "trainer.max_steps=2", "trainer.eval_every=2", "trainer.save_every=2",
           f"output_dir={tmp}"]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return next(tmp.rglob("config.yaml")).parent


def start_server(run: Path, max_threads: int) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ptune", "serve", f"run={run}", "port=0",
                             f"max_threads={max_threads}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env)
    line = proc.stdout.readline()
    if "http://127.0.0.1:" not in line:
        proc.kill()
        raise SystemExit(f"ptune serve did not start: {line!r}")
    return proc, int(line.split("http://127.0.0.1:")[1].split()[0])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_request(port: int, i: int) -> tuple[float, int]:
    body = json.dumps({"inputs": [{"sentence": ROWS[i % len(ROWS)]}]})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        status = resp.status
    except OSError:
        status = 0
    finally:
        conn.close()
    return time.perf_counter() - t0, status


def load(port: int, clients: int, requests: int, on_progress=None) -> dict:
    """`requests` POSTs spread over `clients` threads; every thread's loop is bounded by its share."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    done = [0]

    def client(k: int, n: int):
        for j in range(n):
            dt, status = one_request(port, k * 1_000_003 + j)
            with lock:
                latencies.append(dt)
                statuses[status] = statuses.get(status, 0) + 1
                done[0] += 1
                if on_progress and done[0] % 1000 == 0:
                    on_progress(done[0])

    shares = [requests // clients + (1 if k < requests % clients else 0) for k in range(clients)]
    threads = [threading.Thread(target=client, args=(k, n)) for k, n in enumerate(shares)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000  # noqa: E731
    return {"clients": clients, "requests": len(lat), "wall_s": round(wall, 2), "requests_per_s": round(len(lat) / wall, 1),
            "p50_ms": round(pct(0.50), 1), "p99_ms": round(pct(0.99), 1), "mean_ms": round(statistics.mean(lat) * 1000, 1),
            "statuses": {str(k): v for k, v in sorted(statuses.items())}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a finished run directory to serve (default: train a tiny one)")
    ap.add_argument("--clients", default="8,200")
    ap.add_argument("--requests", type=int, default=2000, help="requests per concurrency level")
    ap.add_argument("--memory-requests", type=int, default=10_000)
    ap.add_argument("--max-threads", type=int, default=64, help="ptune serve max_threads")
    ap.add_argument("--out", default=f"bench/serve-load-{time.strftime('%Y-%m-%d')}")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else tiny_run(Path(tmp))
        proc, port = start_server(run, args.max_threads)
        try:
            for _ in range(20):  # warm-up
                one_request(port, 0)
            levels = [load(port, int(c), args.requests) for c in args.clients.split(",")]
            memory = {"before_mb": round(rss_mb(proc.pid), 1), "samples": []}
            memory_run = load(port, 8, args.memory_requests,
                              lambda n: memory["samples"].append((n, round(rss_mb(proc.pid), 1))))
            memory["after_mb"] = round(rss_mb(proc.pid), 1)
        finally:
            proc.terminate()
            proc.wait(30)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "run": str(run) if args.run else "tiny-llama sst2 prompt (trained here)",
              "machine": f"{os.cpu_count()} cores, {platform.machine()}, python {platform.python_version()}",
              "load_average": os.getloadavg()[0], "max_threads": args.max_threads, "levels": levels,
              "memory": {**memory, "run": memory_run}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# ptune serve under load ({result['date']})", "",
             f"`python scripts/bench_serve_load.py {' '.join(sys.argv[1:])}`; server: {result['run']}; "
             f"{result['machine']}; clients and server share the cores; load average {result['load_average']:.1f}; "
             f"max_threads={args.max_threads}. POST /predict with one SST-2 row per request, a new connection each.", "",
             "| clients | requests | requests/s | p50 ms | p99 ms | mean ms | statuses |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {lv['clients']} | {lv['requests']} | {lv['requests_per_s']} | {lv['p50_ms']} | {lv['p99_ms']} | "
              f"{lv['mean_ms']} | {lv['statuses']} |" for lv in levels]
    m = result["memory"]
    lines += ["", f"Memory over {m['run']['requests']} requests (8 clients, {m['run']['requests_per_s']} requests/s): "
                  f"server RSS {m['before_mb']} MB before, {m['after_mb']} MB after; every 1,000 requests: "
                  + ", ".join(f"{n}: {mb}" for n, mb in m["samples"]) + " MB."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
