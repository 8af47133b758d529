#!/usr/bin/env python
"""Serving several adapters on one frozen backbone: ptune's mixed batches against PEFT's adapter switching.

    .venv/bin/python scripts/bench_serving.py                 # smollm2-135m, 8 prompt + 8 prefix adapters
    .venv/bin/python scripts/bench_serving.py --quick         # tiny-llama, checks the bench runs (tests)
    .venv/bin/python scripts/bench_serving.py --methods prompt --batch-size 16 --rounds 3

The workload: a stream of requests, each a row (an SST-2 dev sentence written as "{sentence} It
was") and the adapter it asks for, one of 8 adapters of one method with 8 different prompt lengths
(`--lengths`). A request is scored by one forward: the next-token log-probabilities after its row
(a verbalizer's scoring forward). The adapters' tensors are random (seeded; the same in both tools):
throughput does not depend on their values, and the outputs' agreement is checked either way.
The stream holds the same number of rows per adapter, shuffled.

Measured, at one batch size B, rows/s and real (non-pad, non-virtual) tokens/s:
- ptune single: the stream grouped by adapter, every batch B rows of ONE adapter, through that
  method's own forward (what `ptune eval` of one run does);
- ptune mixed: the stream in arrival order, every batch B rows of up to 8 adapters in one forward;
- PEFT switch: a PeftModel holding the 8 adapters (peft.get_peft_model + add_adapter) serves each
  window of B arriving rows as a PEFT user can: rows grouped by adapter, `set_adapter` before each
  group, one forward per group (so up to 8 smaller forwards per window);
- PEFT single: as ptune single, through the PeftModel (one adapter per batch of B).
Both tools pad on the right and project only each row's last real position through the LM head
(the PEFT side gets an identity `lm_head` and projects the gathered hidden states itself), so the
LM-head work is the same and what differs is how adapters reach the rows.

Correctness, asserted: ptune mixed == ptune single per row, PEFT switch == PEFT single per row,
and ptune == PEFT per row (max |difference| of the log-probabilities, reported).

Each tool runs in its own subprocess (its own peak RSS), alternately A B A B (`--rounds`), and
inside a job the two modes alternate too (`--reps` passes each); the report gives medians.
Writes bench/serving-<date>.md and .json (or --out PREFIX).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = {
    # one torch thread per job: on a 2-core machine shared with other jobs, 2 threads per job measure contention
    "smollm2": dict(model="smollm2-135m", batch_size=8, batches_per_adapter=1, lengths=[4, 8, 12, 16, 20, 24, 28, 32],
                    reps=1, rounds=2, threads=1),
    "tiny": dict(model="tiny-llama", batch_size=4, batches_per_adapter=1, lengths=[1, 2, 3, 4, 5, 6, 7, 8],
                 reps=1, rounds=1, threads=None),
}
TEMPLATE = "{sentence} It was"
LABEL_WORDS = (" terrible", " great")  # what the report's agreement check reads, besides the full vocabulary
TOLERANCE = 1e-3  # max |log-prob difference| allowed between two ways of computing the same row (fp32)


# ------------------------------------------------------------------------------------------------
# what both tools read: backbone, requests, adapter tensors
# ------------------------------------------------------------------------------------------------
def load_backbone(model: str):
    """ptune's loader (frozen, eval mode) for the model config `model` (conf/model/<model>.yaml)."""
    from omegaconf import OmegaConf

    from ptune import models
    from ptune.cli import compose

    m = compose([f"model={model}"]).model
    return models.load(m.name, m.kind, m.source, m.get("name_or_path"),
                       OmegaConf.to_container(m.tiny) if m.get("tiny") else None, m.get("tokenizer"),
                       seed=m.get("init_seed", 0), trust_remote_code=m.get("trust_remote_code", False))


def requests(tokenizer, spec: dict) -> tuple[list[list[int]], list[int]]:
    """(token ids per row, adapter index per row): batches_per_adapter * B rows per adapter, shuffled."""
    import random

    from ptune.tasks import build

    n_adapters = len(spec["lengths"])
    n = n_adapters * spec["batches_per_adapter"] * spec["batch_size"]
    rows = build("sst2", data_dir=os.environ.get("PTUNE_DATA_DIR")).rows("dev")[:n]
    ids = [tokenizer(TEMPLATE.format(sentence=r["sentence"]), add_special_tokens=False).input_ids for r in rows]
    adapters = [i % n_adapters for i in range(n)]
    random.Random(0).shuffle(adapters)
    return ids, adapters


def adapter_tensors(backbone, method: str, p: int, k: int):
    """Adapter k's random tensor: prompt (p, hidden) at the input embeddings' scale, or a flat prefix
    (p, layers * 2 * kv_heads * head_dim) ~ N(0, 1) in PEFT's prompt_embeddings order."""
    import torch

    d = backbone.dims
    g = torch.Generator().manual_seed(1000 + k)
    if method == "prompt":
        scale = backbone.model.get_input_embeddings().weight.float().std().item()
        return torch.randn(p, d.hidden, generator=g) * scale
    return torch.randn(p, d.n_layers * 2 * d.n_kv_heads * d.head_dim, generator=g)


def batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order), size)]


def grouped(adapters: list[int]) -> list[int]:
    """Row indices sorted by adapter (stable): with an equal count per adapter divisible by B, every
    batch of B holds one adapter."""
    return sorted(range(len(adapters)), key=lambda i: adapters[i])


def pad_right(ids: list[list[int]], pad_id: int):
    """(input_ids, attention_mask), both (rows, longest), right-padded."""
    import torch

    width = max(len(r) for r in ids)
    x = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, r in enumerate(ids):
        x[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return x, mask


def last_log_probs(model, hidden, mask, offset: int = 0):
    """Log-probabilities (rows, vocab) at each row's last real token. hidden: (rows, offset + seq,
    hidden), mask: (rows, seq); `offset` virtual positions come first in hidden."""
    import torch

    last = offset + mask.sum(-1) - 1  # (rows,)
    h = hidden[torch.arange(hidden.shape[0]), last]  # (rows, hidden)
    return torch.log_softmax(model.get_output_embeddings()(h).float(), -1)


def timed_pass(serve, order: list[list[int]], ids: list[list[int]]) -> dict:
    """Run `serve(batch of row indices)` over all batches; rows/s, tokens/s and the outputs by row."""
    outputs = {}
    t0 = time.perf_counter()
    for idx in order:
        for i, out in zip(idx, serve(idx)):
            outputs[i] = out
    dt = time.perf_counter() - t0
    rows = sum(len(b) for b in order)
    tokens = sum(len(ids[i]) for b in order for i in b)
    return {"s": dt, "rows_per_s": rows / dt, "tokens_per_s": tokens / dt, "outputs": outputs}


def alternate(modes: dict, reps: int, ids) -> dict:
    """modes: {name: (serve, batches)}; each mode `reps` times, alternating, after one warm-up batch each."""
    for serve, order in modes.values():
        serve(order[0])
    runs = {name: [] for name in modes}
    for _ in range(reps):
        for name, (serve, order) in modes.items():
            runs[name].append(timed_pass(serve, order, ids))
    return runs


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[i] - b[i]).abs().max()) for i in a)


def plans(ids, adapters, spec: dict) -> dict:
    """The forwards (lists of row indices) of one pass in every mode of both tools."""
    b = spec["batch_size"]
    stream = batches(list(range(len(ids))), b)
    out = {"single": batches(grouped(adapters), b), "mixed": stream,
           # PEFT: each arriving window of B rows split by adapter, one forward per group
           "switch": [[i for i in w if adapters[i] == k] for w in stream for k in sorted({adapters[i] for i in w})]}
    if spec.get("sorted_window"):
        out["mixed_sorted"] = by_width(list(range(len(ids))), ids, adapters, spec, b, spec["sorted_window"] * b)
    return out


LAYOUT = "row"  # ptune.infer.mixed packs each row as its own prompt + its own tokens (reports before it: "block")


def positions(forwards: list[list[int]], ids, adapters, spec: dict) -> int:
    """Rows x positions the layers compute in one pass, padding included: per forward, its rows x
    its widest row, a row being its own prompt + its own tokens (ptune.infer.mixed packs each row so; a
    one-adapter forward, ptune's or PEFT's, is its prompt + its longest row). Prefixes add keys
    only, no positions. Reports written before that layout ("layout" absent from their config) are
    counted as ptune.infer.mixed then laid a batch out: one prompt block as wide as the forward's longest
    prompt, then the tokens padded to the longest row."""
    total = 0
    for rows in forwards:
        own = [spec["lengths"][adapters[i]] if spec["method"] == "prompt" else 0 for i in rows]
        if spec.get("layout", "block") == "row":
            total += len(rows) * max(p + len(ids[i]) for p, i in zip(own, rows))
        else:
            total += len(rows) * (max(own) + max(len(ids[i]) for i in rows))
    return total


def summary(runs: list[dict], forwards: list[list[int]], ids, adapters, spec: dict) -> dict:
    med = statistics.median
    useful = sum(len(r) + (spec["lengths"][a] if spec["method"] == "prompt" else 0) for r, a in zip(ids, adapters))
    computed = positions(forwards, ids, adapters, spec)
    return {"rows_per_s": med(r["rows_per_s"] for r in runs), "tokens_per_s": med(r["tokens_per_s"] for r in runs),
            "pass_s": [round(r["s"], 3) for r in runs], "forwards_per_pass": len(forwards),
            "positions_per_pass": computed, "useful_positions_fraction": useful / computed}


def digest(outputs: dict, word_ids: list[int]) -> list[list[float]]:
    """Per row (in row order) the log-probs of the label words: what the driver compares across tools."""
    return [[round(float(outputs[i][w]), 5) for w in word_ids] for i in sorted(outputs)]


# ------------------------------------------------------------------------------------------------
# the PEFT job
# ------------------------------------------------------------------------------------------------
def job_peft(spec: dict) -> dict:
    import peft
    import torch

    backbone = load_backbone(spec["model"])
    tok, model = backbone.tokenizer, backbone.model
    ids, adapters = requests(tok, spec)
    lengths, method = spec["lengths"], spec["method"]

    def config(p):
        if method == "prompt":
            return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p)
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p, prefix_projection=False)

    lm_head = model.get_output_embeddings()
    pm = peft.get_peft_model(model, config(lengths[0]), adapter_name="a0")
    for k, p in enumerate(lengths[1:], 1):
        pm.add_adapter(f"a{k}", config(p))
    with torch.no_grad():
        for k, p in enumerate(lengths):
            pm.prompt_encoder[f"a{k}"].embedding.weight.copy_(adapter_tensors(backbone, method, p, k))
    pm.eval()
    # The LM head projects only the scored positions, as on ptune's side: PEFT's forward returns
    # hidden states (an identity head), gathered and projected below with the real head.
    model.lm_head = torch.nn.Identity()

    @torch.no_grad()
    def forward(idx):
        k = adapters[idx[0]]
        pm.set_adapter(f"a{k}")
        x, mask = pad_right([ids[i] for i in idx], tok.pad_token_id)
        hidden = pm(input_ids=x, attention_mask=mask, use_cache=False).logits
        offset = lengths[k] if method == "prompt" else 0  # prompt tuning's virtual positions come first
        last = offset + mask.sum(-1) - 1
        return torch.log_softmax(lm_head(hidden[torch.arange(len(idx)), last]).float(), -1)

    def switch(window):  # a window of arriving rows, one forward per adapter in it
        out = {}
        for k in sorted({adapters[i] for i in window}):
            group = [i for i in window if adapters[i] == k]
            out.update(zip(group, forward(group)))
        return [out[i] for i in window]

    plan = plans(ids, adapters, spec)
    runs = alternate({"single": (forward, plan["single"]), "switch": (switch, plan["mixed"])}, spec["reps"], ids)
    ref = runs["single"][0]["outputs"]
    diff = max(max_diff(r["outputs"], ref) for name in runs for r in runs[name])
    assert diff < TOLERANCE, f"PEFT switching differs from PEFT single-adapter batches by {diff}"
    words = [tok(w, add_special_tokens=False).input_ids[0] for w in LABEL_WORDS]
    return {"single": summary(runs["single"], plan["single"], ids, adapters, spec),
            "mixed": summary(runs["switch"], plan["switch"], ids, adapters, spec),
            "max_diff_mixed_vs_single": diff, "digest": digest(ref, words),
            "rows": len(ids), "mean_row_tokens": statistics.mean(len(r) for r in ids)}


# ------------------------------------------------------------------------------------------------
# the ptune job
# ------------------------------------------------------------------------------------------------
def ptune_methods(backbone, method: str, lengths: list[int]) -> list:
    """8 loaded ptune methods of `method`, adapter k of length lengths[k] (frozen, inference)."""
    from ptune import methods as registry

    out = []
    for k, p in enumerate(lengths):
        kwargs = {"num_virtual_tokens": p} if method == "prompt" else {"num_virtual_tokens": p, "projection": False}
        m = registry.build(method, backbone, **kwargs)
        m.load_adapter_tensors({method: adapter_tensors(backbone, method, p, k)})
        out.append(m.eval())
    return out


def by_width(order: list[int], ids, adapters, spec: dict, size: int, window: int) -> list[list[int]]:
    """Batches of `size` from consecutive windows of `window` arriving rows, each window's rows
    sorted by their width in a mixed forward: own prompt (prompt adapters) + own tokens, as
    ptune.infer.mixed packs a row and Pool.predict sorts. Reports of the earlier layout ("block", where
    every row was as wide as the batch's longest prompt + longest row) sorted by (prompt length,
    row length), and are recounted so."""
    lengths = spec["lengths"]
    if spec.get("layout", "block") == "row":
        def key(i):
            return (lengths[adapters[i]] if spec["method"] == "prompt" else 0) + len(ids[i])
    else:
        def key(i):
            return lengths[adapters[i]], len(ids[i])
    out = []
    for w in range(0, len(order), window):
        out += batches(sorted(order[w:w + window], key=key), size)
    return out


def sort_label(config: dict) -> str:
    return "row width" if config.get("layout") == "row" else "prompt length"


def job_ptune(spec: dict) -> dict:
    import torch

    from ptune.infer import mixed

    backbone = load_backbone(spec["model"])
    tok, model = backbone.tokenizer, backbone.model
    ids, adapters = requests(tok, spec)
    methods = ptune_methods(backbone, spec["method"], spec["lengths"])

    @torch.no_grad()
    def single(idx):  # one adapter's own forward: the path `ptune eval` of one run takes
        m = methods[adapters[idx[0]]]
        x, mask = pad_right([ids[i] for i in idx], tok.pad_token_id)
        hidden = model.base_model(**m.model_inputs(x, mask)).last_hidden_state
        return last_log_probs(model, hidden, mask, m.n_prepended)

    @torch.no_grad()
    def mix(idx):  # every row through its own adapter, one forward (ptune.infer.mixed)
        x, mask = pad_right([ids[i] for i in idx], tok.pad_token_id)
        hidden = mixed.token_states(methods, x, mask, torch.tensor([adapters[i] for i in idx]))
        return last_log_probs(model, hidden, mask)

    plan = plans(ids, adapters, spec)
    modes = {"single": (single, plan["single"]), "mixed": (mix, plan["mixed"])}
    if "mixed_sorted" in plan:
        modes["mixed_sorted"] = (mix, plan["mixed_sorted"])
    runs = alternate(modes, spec["reps"], ids)
    ref = runs["single"][0]["outputs"]
    diff = max(max_diff(r["outputs"], ref) for name in runs for r in runs[name])
    assert diff < TOLERANCE, f"ptune mixed batches differ from single-adapter batches by {diff}"
    words = [tok(w, add_special_tokens=False).input_ids[0] for w in LABEL_WORDS]
    out = {name: summary(runs[name], modes[name][1], ids, adapters, spec) for name in modes}
    return {**out, "max_diff_mixed_vs_single": diff, "digest": digest(ref, words), "rows": len(ids),
            "mean_row_tokens": statistics.mean(len(r) for r in ids)}


JOBS = {"ptune": job_ptune, "peft": job_peft}


def _job(spec: dict) -> dict:
    import logging

    import torch

    logging.disable(logging.INFO)
    try:
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        result = JOBS[spec["tool"]](spec)
    finally:
        logging.disable(logging.NOTSET)  # the caller's logging as it was (in-process: tests read log lines)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["torch_threads"] = torch.get_num_threads()
    return result


def _job_main(spec_json: str) -> None:
    print("BENCH-RESULT " + json.dumps(_job(json.loads(spec_json))), flush=True)


# ------------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------------
def run_job(spec: dict, in_process: bool = False) -> dict:
    """One job's result dict, or {"error": "..."}; in a fresh subprocess (its own peak RSS) unless
    in_process (--quick: no interpreter start-up per job; peak RSS is then the process's so far)."""
    if in_process:
        try:
            return _job(spec)
        except Exception as e:  # noqa: BLE001 - a failed job is a row, not a lost bench
            return {"error": f"{type(e).__name__}: {e}"}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    shared = ROOT.parent / "shared" / "data"
    if "PTUNE_DATA_DIR" not in env and shared.is_dir():  # a checkout beside the shared data (this image, CI)
        env["PTUNE_DATA_DIR"] = str(shared)
    proc = subprocess.run([sys.executable, __file__, "_job", json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH-RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit {proc.returncode}"}
    return json.loads(lines[-1][len("BENCH-RESULT "):])


def median_of(runs: list[dict], mode: str, key: str) -> float:
    return statistics.median(r[mode][key] for r in runs)


def compare(method: str, runs: dict, config: dict) -> dict:
    """One row of the report from the rounds of both tools; the agreement checks across tools."""
    row = {"method": method, "raw": runs}
    errors = {t: r["error"] for t in runs for r in runs[t] if "error" in r}
    if errors:
        row["error"] = "; ".join(f"{t}: {e}" for t, e in errors.items())
        return row
    p, q = runs["ptune"], runs["peft"]
    for tool, rs in (("ptune", p), ("peft", q)):
        modes = [m for m in ("single", "mixed", "mixed_sorted") if m in rs[0]]
        row[tool] = {m: {k: median_of(rs, m, k) for k in ("rows_per_s", "tokens_per_s")} |
                     {k: rs[0][m][k] for k in ("forwards_per_pass", "positions_per_pass", "useful_positions_fraction")}
                     for m in modes}
        row[tool]["peak_rss_mb"] = statistics.median(r["peak_rss_mb"] for r in rs)
        row[tool]["max_diff_mixed_vs_single"] = max(r["max_diff_mixed_vs_single"] for r in rs)
    row["max_diff_ptune_vs_peft"] = max(abs(a - b) for x, y in zip(p[0]["digest"], q[0]["digest"])
                                        for a, b in zip(x, y))
    assert row["max_diff_ptune_vs_peft"] < TOLERANCE, f"ptune and PEFT disagree by {row['max_diff_ptune_vs_peft']}"
    pt, pf = row["ptune"], row["peft"]
    row["ratios"] = {"ptune mixed / ptune single": pt["mixed"]["rows_per_s"] / pt["single"]["rows_per_s"],
                     "PEFT switch / PEFT single": pf["mixed"]["rows_per_s"] / pf["single"]["rows_per_s"],
                     "ptune mixed / PEFT switch": pt["mixed"]["rows_per_s"] / pf["mixed"]["rows_per_s"],
                     "ptune single / PEFT single": pt["single"]["rows_per_s"] / pf["single"]["rows_per_s"],
                     "peak RSS ptune / PEFT": pt["peak_rss_mb"] / pf["peak_rss_mb"]}
    if "mixed_sorted" in pt:
        row["ratios"][f"ptune mixed, window sorted by {sort_label(config)} / ptune single"] = (
            pt["mixed_sorted"]["rows_per_s"] / pt["single"]["rows_per_s"])
    return row


def render(path: Path) -> None:
    """Recompute a report's position counts (deterministic: tokenizer and batch plans, no forward)
    and rewrite its .json and .md; the measured figures are left as they are."""
    report = json.loads(path.read_text())
    base = report["config"]
    tok = load_backbone(base["model"]).tokenizer
    for row in report["rows"]:
        if "error" in row:
            continue
        spec = {**base, "method": row["method"]}
        ids, adapters = requests(tok, spec)
        plan = plans(ids, adapters, spec)
        for tool, modes in (("ptune", ("single", "mixed", "mixed_sorted")), ("peft", ("single", "switch"))):
            for mode in [m for m in modes if m in plan]:
                stats = summary([{"rows_per_s": 0, "tokens_per_s": 0, "s": 0}], plan[mode], ids, adapters, spec)
                key = "mixed" if mode == "switch" else mode
                row[tool][key].update({k: stats[k] for k in ("forwards_per_pass", "positions_per_pass",
                                                             "useful_positions_fraction")})
    _write(path.with_suffix(""), report)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny-llama, one round: checks the bench runs (tests)")
    ap.add_argument("--methods", default="prompt,prefix", help="comma-separated: prompt, prefix (8 adapters each)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lengths", help="the 8 adapters' prompt lengths, comma-separated")
    ap.add_argument("--batches-per-adapter", type=int, help="stream length = adapters x this x batch size")
    ap.add_argument("--rounds", type=int, help="A B pairs of subprocesses per method")
    ap.add_argument("--reps", type=int, help="passes per mode inside a job, alternating")
    ap.add_argument("--sorted-window", type=int, default=0,
                    help="also measure mixed batches cut from windows of this many batches sorted by row width "
                         "(own prompt + tokens)")
    ap.add_argument("--threads", type=int, help="torch threads per job (default: torch's)")
    ap.add_argument("--out", help="output prefix (default bench/serving-<date>)")
    ap.add_argument("--render", metavar="JSON", help="recompute an existing report's position counts; runs no forward")
    a = ap.parse_args(argv)
    if a.render:
        render(Path(a.render))
        return 0
    base = dict(CONFIGS["tiny" if a.quick else "smollm2"])
    for key in ("batch_size", "batches_per_adapter", "rounds", "reps", "threads"):
        if getattr(a, key) is not None:
            base[key] = getattr(a, key)
    if a.lengths:
        base["lengths"] = [int(x) for x in a.lengths.split(",")]
    base["sorted_window"] = a.sorted_window
    base["layout"] = LAYOUT
    if a.quick:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        shared = ROOT.parent / "shared" / "data"
        if "PTUNE_DATA_DIR" not in os.environ and shared.is_dir():
            os.environ["PTUNE_DATA_DIR"] = str(shared)
    out = Path(a.out) if a.out else ROOT / "bench" / f"serving-{datetime.date.today().isoformat()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = dict(command=" ".join(["scripts/bench_serving.py"] + (argv if argv is not None else sys.argv[1:])),
                  date=datetime.datetime.now().isoformat(timespec="seconds"), machine=_machine(),
                  load_before=os.getloadavg(), config=base, in_process=a.quick, rows=[])
    t_start = time.time()
    for method in [m for m in a.methods.split(",") if m]:
        runs = {"ptune": [], "peft": []}
        for r in range(base["rounds"]):
            for tool in ("ptune", "peft"):  # A B A B
                res = run_job({**base, "tool": tool, "method": method}, in_process=a.quick)
                runs[tool].append(res)
                print(f"{method} round {r + 1} {tool}: {_short(res)}", flush=True)
        report["rows"].append(compare(method, runs, base))
        _write(out, report)  # after every method: an interrupted bench keeps what it measured
    report["load_after"] = os.getloadavg()
    report["bench_wall_s"] = round(time.time() - t_start, 1)
    _write(out, report)
    print(f"wrote {out}.md and {out}.json ({report['bench_wall_s']:.0f} s)")
    return 0 if all("error" not in r for r in report["rows"]) else 1


def _short(res: dict) -> str:
    if "error" in res:
        return "ERROR " + res["error"]
    modes = [m for m in ("single", "mixed", "mixed_sorted") if m in res]
    return ", ".join(f"{m} {res[m]['rows_per_s']:.1f} rows/s" for m in modes) + \
        f", rss {res['peak_rss_mb']:.0f} MB, max diff {res['max_diff_mixed_vs_single']:.1e}"


def _machine() -> dict:
    import torch

    return dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__,
                threads=torch.get_num_threads(), python=platform.python_version())


def _write(out: Path, report: dict) -> None:
    Path(f"{out}.json").write_text(json.dumps(report, indent=1) + "\n")
    Path(f"{out}.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    c, m = report["config"], report["machine"]
    lines = [f"# Serving bench {report['date']}: mixed-adapter batches (ptune) vs adapter switching (PEFT)", "",
             f"`{report['command']}`", "",
             f"{c['model']}, {len(c['lengths'])} adapters per method with prompt lengths {c['lengths']} (random "
             f"tensors, seeded, the same in both tools), a stream of {len(c['lengths']) * c['batches_per_adapter'] * c['batch_size']} "
             f"SST-2 dev rows (\"{{sentence}} It was\", next-token log-probs at the last real token), equal count per "
             f"adapter, shuffled; batch size {c['batch_size']}. Single = batches of one adapter; ptune mixed = "
             f"arrival order, up to {len(c['lengths'])} adapters per forward; PEFT switch = each window of "
             f"{c['batch_size']} arriving rows split by adapter, set_adapter + one forward per group. "
             f"{c['rounds']} A-B round(s) of one subprocess per tool, {c['reps']} alternating pass(es) per mode "
             f"in each; medians. Machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']}, "
             f"{_job_threads(report)} torch thread(s) per job, load average before {_load(report['load_before'])}"
             + (f", after {_load(report['load_after'])}" if "load_after" in report else "") + ".", "",
             "Positions = what the layers compute per pass, padding included: per forward, "
             + ("its rows x its widest row, a row being its own prompt + its own tokens (ptune.infer.mixed packs each "
                "row so)" if c.get("layout") == "row" else
                "rows x (prompt slots + longest row), the slots as wide as the forward's longest prompt (ptune.infer.mixed's "
                "layout then)")
             + "; useful = each row's own prompt + tokens.", "",
             "| method | tool | mode | forwards / pass | positions / pass (useful) | rows/s | tokens/s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        if "error" in row:
            lines.append(f"| {row['method']} | error: {row['error'][:200]} | | | | | | |")
            continue
        for tool, modes in (("ptune", ("single", "mixed", "mixed_sorted")), ("PEFT", ("single", "mixed"))):
            r = row[tool.lower()]
            for mode in [x for x in modes if x in r]:
                name = {"single": "single adapter", "mixed": "8 mixed" if tool == "ptune" else "8, switching",
                        "mixed_sorted": f"8 mixed, window sorted by {sort_label(c)}"}[mode]
                lines.append(f"| {row['method']} | {tool} | {name} | {r[mode]['forwards_per_pass']} | "
                             f"{r[mode]['positions_per_pass']} ({r[mode]['useful_positions_fraction']:.0%}) | "
                             f"{r[mode]['rows_per_s']:.1f} | {r[mode]['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", "| method | " + " | ".join(report["rows"][0].get("ratios", {})) + " | max abs diff: ptune mixed vs "
              "single / PEFT switch vs single / ptune vs PEFT |", "|---" * (len(report["rows"][0].get("ratios", {})) + 2) + "|"]
    for row in report["rows"]:
        if "error" not in row:
            lines.append(f"| {row['method']} | " + " | ".join(f"**{v:.2f}x**" for v in row["ratios"].values()) +
                         f" | {row['ptune']['max_diff_mixed_vs_single']:.1e} / {row['peft']['max_diff_mixed_vs_single']:.1e}"
                         f" / {_small(row['max_diff_ptune_vs_peft'])} |")
    lines += ["", f"Bench wall time: {report.get('bench_wall_s', 'unfinished')} s.", ""]
    return "\n".join(lines)


def _job_threads(report: dict):
    raw = [r for row in report["rows"] for rs in row.get("raw", {}).values() for r in rs if "torch_threads" in r]
    return raw[0]["torch_threads"] if raw else report["machine"]["threads"]


def _small(x: float) -> str:
    """The cross-tool difference is read from log-probs rounded to 5 decimals (the digest)."""
    return f"{x:.1e}" if x > 0 else "< 1e-5"


def _load(avg) -> str:
    return " / ".join(f"{x:.2f}" for x in avg) + " (1/5/15 min)"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_job":
        _job_main(sys.argv[2])
        sys.exit(0)
    sys.exit(main())
