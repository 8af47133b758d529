"""A frozen backbone sharded (trainer.shard=fsdp) and quantized (model.quantize): losses, memory and time
against the plain job.

    python scripts/bench_big_backbones.py [--sections shard,quantize] [--model smollm2-135m] [--set KEY=VALUE ...]
                                          [--quick] [--out bench/big-backbones-<date>]

shard: the same E2E prompt-tuning job (global batch 8) in one process, in two gloo processes unsharded and in
two sharded; the loss curves, the backbone bytes a process holds (summary.json's backbone_mb), the peak RSS of
rank 0 after loading (peak_memory_mb; a sharded job's peak restarts once its layers are sharded), the host's
peak (all of the job's processes together, sampled every 0.1 s, loading included) and time.
quantize: the same job with model.quantize=none / int8 / nf4 under bf16 (prefix tuning on E2E, prompt tuning
on SST-2): the losses after the same steps, the dev metric, the backbone bytes, peak RSS and time per step.
--quick: tiny-llama, 2 steps, quantize on E2E only (tests/test_bench.py runs it). Writes <out>.md and <out>.json, prints the md.
Two processes on 2 cores share them: the sharded times say what sharding costs in communication on one
machine, not what it gains on several devices.
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


def job(out: Path, keys: list[str], processes: int = 1, cuda: bool = False) -> dict:
    """One `ptune train` in its own process(es), on the CPU unless cuda (scripts/gpu_check.py)."""
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    env = {**ENV, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes)), **({} if cuda else {"CUDA_VISIBLE_DEVICES": ""})}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([*launcher, "-m", "ptune", "train", *keys, f"output_dir={out}"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=err, text=True)
        host_peak = host_peak_mb(p)
        if p.returncode:
            err.seek(0)
            raise SystemExit(f"ptune train {' '.join(keys)} failed: {err.read().strip()[-600:]}")
    run = next(out.rglob("summary.json")).parent
    s = json.loads((run / "summary.json").read_text())
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return {"command": ("torchrun --nproc_per_node %d -m " % processes if processes > 1 else "") + "ptune train "
            + " ".join(keys), "losses": losses, "eval": s["eval"], "backbone_mb": s["backbone_mb"],
            "peak_memory_mb": s["peak_memory_mb"], "host_peak_mb": host_peak,
            "s_per_step": round(s["train_time_s"] / s["steps"], 3), "job_s": round(time.perf_counter() - t0, 1)}


def host_peak_mb(p: subprocess.Popen, every: float = 0.1) -> float:
    """Waits for p; the largest sum of resident memory of p and its descendants seen (each process counts the
    shared library pages it maps, as `ps` does): what the job asks of the machine, loading included."""
    import psutil

    top, peak = psutil.Process(p.pid), 0
    while p.poll() is None:
        total = 0
        try:
            for q in [top, *top.children(recursive=True)]:
                total += q.memory_info().rss
        except psutil.Error:  # a process ended between the listing and the reading
            pass
        peak = max(peak, total)
        time.sleep(every)
    return round(peak / 2**20, 1)


def common(model_keys: list[str], steps: int, batch: int) -> list[str]:
    return [*model_keys, f"trainer.max_steps={steps}", f"trainer.eval_every={steps}", f"trainer.save_every={steps}",
            "trainer.log_every=1", f"trainer.batch_size={batch}", "trainer.group_by_length=false"]


def shard_section(tmp: Path, model_keys: list[str], steps: int, cuda: bool = False) -> list[dict]:
    """Prompt tuning on E2E, global batch 8: 1 process, 2 unsharded, 2 sharded; a failed job is a row."""
    keys = [*common(model_keys, steps, 8), "method=prompt", "task=e2e", "task.max_eval_samples=4",
            f"task.max_train_samples={8 * steps}", "task.max_new_tokens=16", "task.metrics=[bleu]"]
    half = [k.replace("trainer.batch_size=8", "trainer.batch_size=4") for k in keys]
    rows = []
    for name, out, ks, processes in (("1 process", "one", keys, 1), ("2 processes, unsharded", "two", half, 2),
                                     ("2 processes, trainer.shard=fsdp", "sharded", [*half, "trainer.shard=fsdp"], 2)):
        try:
            r = job(tmp / out, ks, processes, cuda=cuda)
        except SystemExit as e:
            rows.append({"job": name, "error": str(e)[-300:]})
            continue
        base = next((x["losses"] for x in rows if "losses" in x), r["losses"])
        rows.append({"job": name, **r, "max_rel_loss_diff_vs_1": max(abs(a - b) / abs(a) for a, b in zip(base, r["losses"]))})
    return rows


TASK_JOBS = {  # task: the method quantized through and its own keys (dev samples, generation length, lr)
    "e2e": ("prefix", ["task.max_eval_samples=40", "task.max_new_tokens=40", "task.metrics=[bleu]"]),
    "sst2": ("prompt", ["task.max_eval_samples=200", "trainer.lr=0.03"]),
}


def quantize_section(tmp: Path, model_keys: list[str], steps: int, tasks: tuple[str, ...] = ("e2e", "sst2"),
                     hows: tuple[str, ...] = ("none", "int8", "nf4"), batch: int = 8, cuda: bool = False,
                     extra: tuple[str, ...] = ()) -> list[dict]:
    """The same bf16 job per task with each model.quantize; losses against the first (unquantized) row."""
    rows = []
    for task in tasks:
        method, task_keys = TASK_JOBS[task]
        named = {k.split("=")[0] for k in extra}  # extra's keys replace the task's own
        keys = [*common(model_keys, steps, batch), f"method={method}", f"task={task}", "trainer.precision=bf16",
                f"task.max_train_samples={batch * steps}", *(k for k in task_keys if k.split("=")[0] not in named),
                *extra]
        plain = None
        for how in hows:
            try:
                r = job(tmp / f"{task}-{how}", [*keys, f"model.quantize={how}"], cuda=cuda)
            except SystemExit as e:  # a failed job is a row (int4 where torchao's kernel is missing, ...)
                rows.append({"task": task, "method": method, "quantize": how, "error": str(e)[-300:]})
                continue
            plain = plain or r
            rows.append({"task": task, "method": method, "quantize": how, **r,
                         "final_loss_rel_diff_vs_bf16": (r["losses"][-1] - plain["losses"][-1]) / plain["losses"][-1]})
    return rows


def fmt_losses(losses: list[float]) -> str:
    return f"{losses[0]:.4f} -> {losses[-1]:.4f}"


def shard_markdown(rows: list[dict], steps: int, where: str = "") -> list[str]:
    lines = [f"## trainer.shard=fsdp (prompt tuning, E2E, global batch 8, {steps} steps{where})", "",
             "| job | losses (first -> last) | largest relative loss difference to 1 process | backbone MB per "
             "process | peak RSS MB (rank 0) | host peak MB (all processes) | s/step |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['job']} | error: {r['error'][-160:]} |" if "error" in r else
              f"| {r['job']} | {fmt_losses(r['losses'])} | {r['max_rel_loss_diff_vs_1']:.1e} | {r['backbone_mb']} | "
              f"{r['peak_memory_mb']} | {r.get('host_peak_mb', '')} | {r['s_per_step']} |" for r in rows]
    return [*lines, ""]


def quantize_markdown(rows: list[dict], steps: int, batch: int = 8) -> list[str]:
    lines = [f"## model.quantize (bf16, batch {batch}, {steps} steps)", "",
             "| task | method | quantize | losses (first -> last) | final loss vs unquantized | dev | backbone MB | "
             "peak RSS MB | s/step |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['method']} | {r['quantize']} | error: {r['error'][-160:]} |" if "error" in r else
              f"| {r['task']} | {r['method']} | {r['quantize']} | {fmt_losses(r['losses'])} | "
              f"{r['final_loss_rel_diff_vs_bf16']:+.2%} | "
              + ", ".join(f"{k} {v:.4f}" for k, v in r["eval"].items() if isinstance(v, float) and k in
                          ("accuracy", "bleu")) +
              f" | {r['backbone_mb']} | {r['peak_memory_mb']} | {r['s_per_step']} |" for r in rows]
    return [*lines, ""]


def failed(result: dict) -> bool:
    return any("error" in r for name in ("shard", "quantize") for r in result.get(name, []))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="shard,quantize")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=0, help="default: 6 (shard), 40 (quantize)")
    ap.add_argument("--quick", action="store_true", help="tiny-llama, 2 steps")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more model keys, e.g. a random-init size: --model tiny-llama --set model.tiny.hidden_size=1024")
    ap.add_argument("--out", default=f"bench/big-backbones-{time.strftime('%Y-%m-%d')}")
    args = ap.parse_args(argv)
    model = "tiny-llama" if args.quick else args.model
    sections = args.sections.split(",")
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": model,
              "machine": f"{os.cpu_count()} cores, {platform.platform()}"}
    lines = [f"# Sharded and quantized frozen backbones ({result['date']})", "",
             f"`python scripts/bench_big_backbones.py {' '.join(sys.argv[1:] if argv is None else argv)}`; {model}; "
             f"{result['machine']}; OMP threads = cores / processes.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        if "shard" in sections:
            steps = 2 if args.quick else (args.steps or 6)
            result["shard"] = shard_section(Path(tmp), [f"model={model}", *args.set], steps)
            lines += shard_markdown(result["shard"], steps)
        if "quantize" in sections:
            steps = 2 if args.quick else (args.steps or 40)
            result["quantize"] = quantize_section(Path(tmp), [f"model={model}", *args.set], steps,
                                                  ("e2e",) if args.quick else ("e2e", "sst2"))
            lines += quantize_markdown(result["quantize"], steps)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 1 if failed(result) else 0


if __name__ == "__main__":
    sys.exit(main())
