"""Activation checkpointing of the frozen backbone (trainer.gradient_checkpointing): peak memory, time per
step and the losses, with and without it, on the same job.

    python scripts/bench_checkpointing.py [--model smollm2-135m] [--methods prompt,prefix] [--batch-size 16]
                                          [--steps 4] [--quick] [--out bench/checkpointing-<date>]

Each job is `ptune train` in its own process (its peak RSS is its own: summary.json's peak_memory_mb, the
process's VmHWM since the model was loaded, so the loaded weights are in it and the difference between the
two jobs is activations). --quick: tiny-llama, 2 steps (what tests/test_bench.py runs). Writes <out>.md and
<out>.json and prints the md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1",
       "PTUNE_DATA_DIR": os.environ.get("PTUNE_DATA_DIR", str(ROOT.parent / "shared" / "data"))}


def job(out: Path, model: str, method: str, batch: int, steps: int, checkpointing: bool) -> dict:
    keys = [f"model={model}", "task=e2e", f"method={method}", "method.num_virtual_tokens=10",
            f"trainer.batch_size={batch}", f"trainer.max_steps={steps}", f"trainer.eval_every={steps}",
            f"trainer.save_every={steps}", "trainer.log_every=1", "task.max_eval_samples=1", "task.metrics=[bleu]",
            f"task.max_train_samples={batch * steps}", "trainer.group_by_length=false",
            f"trainer.gradient_checkpointing={str(checkpointing).lower()}", f"output_dir={out}"]
    p = subprocess.run([sys.executable, "-m", "ptune", "train", *keys], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, check=False)
    if p.returncode:
        raise SystemExit(f"ptune train {' '.join(keys)} failed: {p.stderr.strip()[-400:]}")
    run = next(out.rglob("summary.json")).parent
    summary = json.loads((run / "summary.json").read_text())
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return {"command": "ptune train " + " ".join(keys[:-1]), "peak_memory_mb": summary["peak_memory_mb"],
            "s_per_step": round(summary["train_time_s"] / summary["steps"], 3), "losses": losses}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="prompt,prefix")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="tiny-llama, 2 steps")
    ap.add_argument("--out", default=f"bench/checkpointing-{time.strftime('%Y-%m-%d')}")
    args = ap.parse_args(argv)
    model, steps = ("tiny-llama", 2) if args.quick else (args.model, args.steps)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            plain = job(Path(tmp) / f"{method}-plain", model, method, args.batch_size, steps, False)
            ckpt = job(Path(tmp) / f"{method}-ckpt", model, method, args.batch_size, steps, True)
            same = max(abs(a - b) for a, b in zip(plain["losses"], ckpt["losses"]))
            rows.append({"method": method, "plain": plain, "checkpointed": ckpt, "max_loss_difference": same,
                         "memory_saved_mb": round(plain["peak_memory_mb"] - ckpt["peak_memory_mb"], 1),
                         "time_ratio": round(ckpt["s_per_step"] / plain["s_per_step"], 2)})
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": model, "batch_size": args.batch_size, "steps": steps,
              "machine": f"{os.cpu_count()} cores, {platform.platform()}", "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Activation checkpointing of the frozen backbone ({result['date']})", "",
             f"`python scripts/bench_checkpointing.py {' '.join(sys.argv[1:] if argv is None else argv)}`; {model}, "
             f"E2E, batch {args.batch_size}, {steps} steps, one process per job; {result['machine']}.", "",
             "| method | peak RSS MB plain | checkpointed | saved MB | s/step plain | checkpointed | time ratio | "
             "largest loss difference |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['plain']['peak_memory_mb']} | {r['checkpointed']['peak_memory_mb']} | "
              f"{r['memory_saved_mb']} | {r['plain']['s_per_step']} | {r['checkpointed']['s_per_step']} | "
              f"{r['time_ratio']}x | {r['max_loss_difference']:.2e} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
