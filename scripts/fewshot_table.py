"""The few-shot table of docs/results.md: every row's commands over the data seeds, run one after
another, each result appended to <out>/results.jsonl as it comes (a rerun skips what is there), and
the table rewritten after every run.

    python scripts/fewshot_table.py --task sst2 --rows zero-shot,linear,pet --seeds 13,21,42,87,100

Every command is printed in the table as it ran (`{seed}` and `{found}` filled in per seed); a row
whose search is per seed runs `ptune search ...` first and passes its overrides.txt to `ptune train`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

PTUNE = [sys.executable, "-m", "ptune"]
COMMON = "model={model} task={task} task.few_shot={k} task.few_shot_seed={seed}"
TRAIN = "trainer.max_steps={steps} trainer.eval_every=10 trainer.save_every=1000 trainer.batch_size=8"
FT = "method=fine-tune trainer.lr=3e-5"
PROMPT = "method=prompt method.num_virtual_tokens=10 trainer.lr=0.03"

# PTR's rows: per task, a template with two answer slots, their words and the rule table (docs/verbalizers.md)
RULES = {
    "cb": "task.head=rules 'task.template=\"{premise} Question: {hypothesis} ? Answer: {mask:settled} , {mask:answer} .\"' "
          "'task.slots={settled: {known: Clearly, open: Perhaps}, answer: {pos: yes, neg: no}}' "
          "'task.rules={entailment: {settled: known, answer: pos}, contradiction: {settled: known, answer: neg}, "
          "neutral: {settled: open, answer: pos}}'",
}

# name: (label, search command or None, train command)
ROWS = {
    "zero-shot": ("zero-shot, manual template and words (method=hard-prompt)", None,
                  "method=hard-prompt task.head=verbalizer"),
    "linear": ("fine-tuning, linear head", None, f"{FT} task.head=linear {TRAIN}"),
    "pet": ("prompt-based fine-tuning, manual template and words (PET / LM-BFF)", None,
            f"{FT} task.head=verbalizer {TRAIN}"),
    "label-words": ("prompt-based fine-tuning, searched label words (LM-BFF auto L)",
                    "search label-words search.k=30 search.n=20", f"{FT} {{found}} {TRAIN}"),
    "label-words-zero-shot": ("zero-shot, searched label words (nothing trained)",
                              "search label-words search.k=30 search.n=20", "method=hard-prompt {found}"),
    "template-zero-shot": ("zero-shot, searched template (nothing trained)", "search template",
                           "method=hard-prompt {found}"),
    "template": ("prompt-based fine-tuning, searched template (LM-BFF auto T, ptune's causal variant)",
                 "search template", f"{FT} {{found}} {TRAIN}"),
    "demos": ("prompt-based fine-tuning + demonstrations (random, one set per example; LM-BFF averages 16 at test)",
              None, f"{FT} task.head=verbalizer task.demonstrations=random {TRAIN}"),
    "demos-zero-shot": ("zero-shot + demonstrations (random, one set)", None,
                        "method=hard-prompt task.head=verbalizer task.demonstrations=random"),
    "autoprompt": ("AutoPrompt, 3 triggers, 20 iterations x 10 candidates, nothing trained",
                   "search autoprompt search.iters=20 search.batch_size=8", "method=hard-prompt {found}"),
    "prompt": ("prompt tuning (10 tokens), manual template", None, f"{PROMPT} task.head=verbalizer {TRAIN}"),
    "prompt-template": ("prompt tuning (10 tokens), searched template", "search template",
                        f"{PROMPT} {{found}} {TRAIN}"),
    # verbalizers (docs/verbalizers.md)
    "zero-shot-calibrated": ("zero-shot, manual words, contextual calibration", None,
                             "method=hard-prompt task.head=verbalizer task.calibrate=true"),
    "kpt-zero-shot": ("zero-shot, knowledgeable verbalizer (manual words + 10 embedding neighbours, refined)", None,
                      "method=hard-prompt task.head=knowledgeable"),
    "kpt-zero-shot-calibrated": ("zero-shot, knowledgeable verbalizer + contextual calibration", None,
                                 "method=hard-prompt task.head=knowledgeable task.calibrate=true"),
    "prompt-calibrated": ("prompt tuning (10 tokens), manual words, calibrated at evaluation", None,
                          f"{PROMPT} task.head=verbalizer task.calibrate=true {TRAIN}"),
    "soft": ("prompt tuning (10 tokens) + soft verbalizer (WARP)", None, f"{PROMPT} task.head=soft-verbalizer {TRAIN}"),
    "proto": ("prompt tuning (10 tokens) + prototypical verbalizer (ProtoVerb)", None,
              f"{PROMPT} task.head=proto-verbalizer {TRAIN}"),
    "kpt": ("prompt tuning (10 tokens) + knowledgeable verbalizer", None, f"{PROMPT} task.head=knowledgeable {TRAIN}"),
    "soft-calibrated": ("prompt tuning (10 tokens) + soft verbalizer, calibrated at evaluation", None,
                        f"{PROMPT} task.head=soft-verbalizer task.calibrate=true {TRAIN}"),
    "proto-calibrated": ("prompt tuning (10 tokens) + prototypical verbalizer, calibrated at evaluation", None,
                         f"{PROMPT} task.head=proto-verbalizer task.calibrate=true {TRAIN}"),
    "kpt-calibrated": ("prompt tuning (10 tokens) + knowledgeable verbalizer, calibrated at evaluation", None,
                       f"{PROMPT} task.head=knowledgeable task.calibrate=true {TRAIN}"),
    "rules-zero-shot": ("zero-shot, two answer slots and a rule table (PTR, task.head=rules)", None,
                        "method=hard-prompt {rules}"),
    "prompt-rules": ("prompt tuning (10 tokens), two answer slots and a rule table (PTR)", None,
                     f"{PROMPT} {{rules}} {TRAIN}"),
    "minilm-linear": ("MiniLM: prompt tuning (10 tokens) + linear head", None,
                      f"{PROMPT} task.head=linear {TRAIN}", "minilm"),
    "minilm-soft": ("MiniLM: prompt tuning (10 tokens) + soft verbalizer at [MASK]", None,
                    f"{PROMPT} task.head=soft-verbalizer {TRAIN}", "minilm"),
    "minilm-proto": ("MiniLM: prompt tuning (10 tokens) + prototypical verbalizer at [MASK]", None,
                     f"{PROMPT} task.head=proto-verbalizer {TRAIN}", "minilm"),
    # MiniLM fine-tuned at 3e-5 with its head at 0.01 (OpenPrompt's ProtoVerb rates): run with --steps 100
    "minilm-ft-linear": ("MiniLM fine-tuned (lr 3e-5, head_lr 0.01, 100 steps) + linear head", None,
                         f"{FT} trainer.head_lr=0.01 task.head=linear {TRAIN}", "minilm"),
    "minilm-ft-soft": ("MiniLM fine-tuned (lr 3e-5, head_lr 0.01, 100 steps) + soft verbalizer at [MASK]", None,
                       f"{FT} trainer.head_lr=0.01 task.head=soft-verbalizer {TRAIN}", "minilm"),
    "minilm-ft-proto": ("MiniLM fine-tuned (lr 3e-5, head_lr 0.01, 100 steps) + prototypical verbalizer at [MASK]",
                        None, f"{FT} trainer.head_lr=0.01 task.head=proto-verbalizer {TRAIN}", "minilm"),
}


def run(cmd: list[str], log) -> tuple[str, float]:
    t0 = time.perf_counter()
    log.write("$ ptune " + " ".join(shlex.quote(c) for c in cmd) + "\n")
    log.flush()
    p = subprocess.run([*PTUNE, *cmd], stdout=subprocess.PIPE, stderr=log, text=True)
    log.write(p.stdout)
    if p.returncode != 0:
        raise RuntimeError(f"ptune {' '.join(cmd[:2])} failed with exit {p.returncode}")
    return p.stdout, time.perf_counter() - t0


def line_value(stdout: str, prefix: str) -> str:
    return next(x.partition(prefix)[2].strip() for x in stdout.splitlines() if x.startswith(prefix))


def one(task: str, row: str, seed: int, k: int, steps: int, out: Path, log, reuse: list[dict]) -> dict:
    _, search, train, *model = ROWS[row]
    if "{rules}" in train and task not in RULES:
        raise RuntimeError(f"row {row} needs a rule table for task {task} (RULES has {sorted(RULES)})")
    common = COMMON.format(task=task, k=k, seed=seed, model=model[0] if model else "smollm2-135m")
    found, search_s, search_cmd = "", None, None
    if search:
        search_cmd = f"{search} {common} output_dir={out}/searches"
        done = next((r for r in reuse if r.get("search_cmd") == f"ptune {search_cmd}" and r.get("search_dir")), None)
        if done is not None:  # the same search on the same seed ran for another row: its result, its time
            sdir, search_s = Path(done["search_dir"]), done["search_s"]
        else:
            stdout, search_s = run(shlex.split(search_cmd), log)
            sdir = Path(line_value(stdout, "search:"))
        found = (sdir / "overrides.txt").read_text().strip()
    else:
        sdir = None
    train = train.replace("{rules}", RULES.get(task, "{rules}"))
    train_cmd = f"train {common} {train.replace('{steps}', str(steps)).replace('{found}', found)} output_dir={out}/runs"
    stdout, train_s = run(shlex.split(train_cmd), log)
    run_dir = Path(line_value(stdout, "run:"))
    summary = json.loads((run_dir / "summary.json").read_text())
    for heavy in ("checkpoints", "adapter", "adapter_best"):  # fine-tune's are the whole model: 0.5-1.5 GB a run
        path = run_dir / heavy
        if path.is_dir() and sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) > 50e6:
            shutil.rmtree(path)
    return {"task": task, "k": k, "row": row, "seed": seed, "test": summary["test"]["metrics"], "dev": summary["eval"],
            "run_dir": str(run_dir), "search_s": search_s, "train_s": round(train_s, 1),
            "search_cmd": f"ptune {search_cmd}" if search_cmd else None, "train_cmd": f"ptune {train_cmd}",
            "search_dir": str(sdir) if search else None}


def table(results: list[dict]) -> str:
    out = []
    for task, k in dict.fromkeys((r["task"], r.get("k", 16)) for r in results):
        rs = [r for r in results if r["task"] == task and r.get("k", 16) == k]
        metrics = list(rs[0]["test"])
        out += [f"### {task} (K={k}, test = the dataset's full dev split; SmolLM2-135M unless the row says MiniLM)", "",
                "| row | seeds | " + " | ".join(f"test {m} (mean ± std)" for m in metrics) +
                " | search s (mean) | train+eval s (mean) |", "|---|---|" + "---|" * (len(metrics) + 2)]
        for row in dict.fromkeys(r["row"] for r in rs):
            group = [r for r in rs if r["row"] == row]
            cells = []
            for m in metrics:
                v = [r["test"][m] for r in group]
                mean = sum(v) / len(v)
                std = math.sqrt(sum((x - mean) ** 2 for x in v) / len(v))
                cells.append(f"{mean:.4f} ± {std:.4f}")
            search = [r["search_s"] for r in group if r["search_s"] is not None]
            s = f"{sum(search) / len(search):.0f}" if search else "–"
            seeds = ",".join(str(r["seed"]) for r in group)
            out.append(f"| {ROWS[row][0]} | {seeds} | " + " | ".join(cells) +
                       f" | {s} | {sum(r['train_s'] for r in group) / len(group):.0f} |")
        out += ["", "Commands (seed 13; the other seeds change task.few_shot_seed):", ""]
        for row in dict.fromkeys(r["row"] for r in rs):
            r = next(r for r in rs if r["row"] == row)
            out += [f"- {ROWS[row][0]}:"] + ([f"  `{r['search_cmd']}` then"] if r["search_cmd"] else []) + \
                   [f"  `{r['train_cmd']}`"]
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--rows", default="zero-shot,linear,pet")
    ap.add_argument("--seeds", default="13,21,42,87,100")
    ap.add_argument("--k", type=int, default=16, help="task.few_shot: training rows per class (CB: 8, its neutral "
                    "class has 16 training rows for K training and K dev rows)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="/tmp/fewshot")
    ap.add_argument("--merge", help="print the table of these output folders' results.jsonl (comma-separated) and exit")
    a = ap.parse_args()
    if a.merge:
        results = [json.loads(x) for d in a.merge.split(",") for x in (Path(d) / "results.jsonl").read_text().splitlines()]
        results = list({(r["task"], r.get("k", 16), r["row"], r["seed"]): r for r in results}.values())  # a rerun: the later folder's
        order = list(ROWS)
        results.sort(key=lambda r: (r["task"] != "sst2", order.index(r["row"]), r["seed"]))
        print(table(results))
        return
    out = Path(a.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    store = out / "results.jsonl"
    results = [json.loads(x) for x in store.read_text().splitlines()] if store.is_file() else []
    with open(out / "commands.log", "a") as log:
        for row in a.rows.split(","):
            for seed in [int(s) for s in a.seeds.split(",")]:
                if any(r["task"] == a.task and r.get("k", 16) == a.k and r["row"] == row and r["seed"] == seed
                       for r in results):
                    continue
                try:
                    r = one(a.task, row, seed, a.k, a.steps, out, log, results)
                except RuntimeError as e:
                    print(f"{a.task} {row} seed {seed}: {e}", flush=True)
                    break
                results.append(r)
                with open(store, "a") as f:
                    f.write(json.dumps(r) + "\n")
                (out / "table.md").write_text(table(results) + "\n")
                print(f"{a.task} {row} seed {seed}: test {r['test']} ({r['train_s']} s)", flush=True)


if __name__ == "__main__":
    main()
