"""`ptune plan` against measured runs, and what fits where for Llama 3 configs.

    python scripts/bench_plan.py [--quick] [--rows <substring>] [--skip-fit] [--out bench/plan-<date>]

Part 1 (measured): each row is one short real `ptune train` job (3 optimizer steps, evaluation on 2-16 rows,
its own process) and `ptune plan` with the same overrides and seq_len=data (the plan then sizes the very
micro-batches the job trains on, from the task's rows as the loop cuts them), also its own process. The
job's summary.json peak_memory_mb (peak RSS since the job started) is compared with the plan's
peak_memory. Also: the plan's FLOPs per step over the median measured step time (the job's metrics.jsonl
step_s), the CPU rate the plan assumes by default (MEASURED_TFLOPS, from the SmolLM2 rows).
Part 2 (fit): Llama-3.2-1B, Llama-3.1-8B and Llama-3.1-70B configs (their published config.json numbers,
written to a temp dir) planned for prompt and prefix tuning, bf16, batch 8 x 512 tokens, on 24/80/141 GiB
GPUs, 1 or 8 processes, with and without quantization, sharding and checkpointing.
--quick: tiny-llama rows only and the 1B fit rows (what a smoke test runs). Writes <out>.md and <out>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
       "PTUNE_DATA_DIR": os.environ.get("PTUNE_DATA_DIR", str(ROOT.parent / "shared" / "data"))}
MB = 2**20
GiB = 2**30

E2E = ["task=e2e", "task.max_eval_samples=2", "task.max_new_tokens=8", "task.metrics=[bleu]"]  # no METEOR JVM
SST2 = ["task=sst2", "task.max_eval_samples=16"]
# (row name, overrides): the measured rows. Batch sizes and checkpointing vary per model; nothing is tuned per row.
ROWS = [
    ("tiny-llama e2e prompt b8", ["model=tiny-llama", "method=prompt", *E2E, "trainer.batch_size=8"]),
    ("tiny-llama e2e prompt b32", ["model=tiny-llama", "method=prompt", *E2E, "trainer.batch_size=32"]),
    ("tiny-llama e2e prefix b32 ckpt", ["model=tiny-llama", "method=prefix", *E2E, "trainer.batch_size=32",
                                        "trainer.gradient_checkpointing=true"]),
    ("tiny-llama e2e prefix b32 int8", ["model=tiny-llama", "method=prefix", *E2E, "trainer.batch_size=32",
                                        "model.quantize=int8"]),
    ("tiny-llama e2e prompt b32 fsdp x2", ["model=tiny-llama", "method=prompt", *E2E, "trainer.batch_size=32",
                                           "trainer.shard=fsdp"]),
    ("tiny-gpt2 e2e prefix b16", ["model=tiny-gpt2", "method=prefix", *E2E, "trainer.batch_size=16"]),
    ("tiny-gpt2 e2e prefix b16 ckpt", ["model=tiny-gpt2", "method=prefix", *E2E, "trainer.batch_size=16",
                                       "trainer.gradient_checkpointing=true"]),
    ("minilm sst2 prompt b16", ["model=minilm", "method=prompt", *SST2, "trainer.batch_size=16"]),
    ("minilm sst2 p-tuning-v2 b64", ["model=minilm", "method=p-tuning-v2", *SST2, "trainer.batch_size=64"]),
    ("minilm sst2 p-tuning-v2 b64 ckpt", ["model=minilm", "method=p-tuning-v2", *SST2, "trainer.batch_size=64",
                                          "trainer.gradient_checkpointing=true"]),
    ("smollm2 e2e prefix b8", ["model=smollm2-135m", "method=prefix", *E2E, "trainer.batch_size=8"]),
    ("smollm2 e2e prefix b16", ["model=smollm2-135m", "method=prefix", *E2E, "trainer.batch_size=16"]),
    ("smollm2 e2e prefix b16 ckpt", ["model=smollm2-135m", "method=prefix", *E2E, "trainer.batch_size=16",
                                     "trainer.gradient_checkpointing=true"]),
    ("smollm2 e2e prompt b16", ["model=smollm2-135m", "method=prompt", *E2E, "trainer.batch_size=16"]),
    ("smollm2 e2e prefix b8 bf16", ["model=smollm2-135m", "method=prefix", *E2E, "trainer.batch_size=8",
                                    "trainer.precision=bf16"]),
    ("smollm2 e2e prefix b16 bf16 ckpt", ["model=smollm2-135m", "method=prefix", *E2E, "trainer.batch_size=16",
                                          "trainer.precision=bf16", "trainer.gradient_checkpointing=true"]),
    ("smollm2 e2e prefix b8 int8", ["model=smollm2-135m", "method=prefix", *E2E, "trainer.batch_size=8",
                                    "model.quantize=int8"]),
    ("smollm2 e2e prompt b16 nf4", ["model=smollm2-135m", "method=prompt", *E2E, "trainer.batch_size=16",
                                    "model.quantize=nf4"]),
    ("smollm2 e2e prompt b8 fsdp x2", ["model=smollm2-135m", "method=prompt", *E2E, "trainer.batch_size=8",
                                       "trainer.shard=fsdp"]),
    ("smollm2 sst2 prompt b16", ["model=smollm2-135m", "method=prompt", *SST2, "trainer.batch_size=16"]),
    ("smollm2 sst2 prompt b32 ckpt", ["model=smollm2-135m", "method=prompt", *SST2, "trainer.batch_size=32",
                                      "trainer.gradient_checkpointing=true"]),
]
STEPS = ["trainer.max_steps=3", "trainer.eval_every=3", "trainer.save_every=3", "trainer.log_every=1"]

# Published config.json numbers (meta-llama on the Hugging Face hub).
LLAMA = {
    "Llama-3.2-1B": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, tie_word_embeddings=True, head_dim=64),
    "Llama-3.1-8B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, tie_word_embeddings=False, head_dim=128),
    "Llama-3.1-70B": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                          intermediate_size=28672, tie_word_embeddings=False, head_dim=128),
}
LLAMA_COMMON = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_act="silu",
                    max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, attention_bias=False,
                    mlp_bias=False, attention_dropout=0.0, bos_token_id=128000, eos_token_id=128001,
                    torch_dtype="bfloat16")


# glibc's malloc raises its mmap threshold as large blocks are freed (up to 32 MiB), after which freed activations
# stay in its heap, resident; a fixed threshold makes it hand them back, so RSS follows the live tensors.
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _ptune(args: list[str], env: dict | None = None, processes: int = 1) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [sys.executable]
    return subprocess.run([*launch, "-m", "ptune", *args], cwd=ROOT, env={**ENV, **(env or {})},
                          capture_output=True, text=True, check=False)


def _processes(keys: list[str]) -> int:
    """2 processes (torchrun) for a sharded row, else 1."""
    return 2 if "trainer.shard=fsdp" in keys else 1


def _train(keys: list[str], out: Path, env: dict | None = None) -> tuple[dict, list[float]]:
    job = _ptune(["train", *keys, *STEPS, f"output_dir={out}"], env, _processes(keys))
    if job.returncode:
        raise SystemExit(f"ptune train {' '.join(keys)} failed: {job.stderr.strip()[-600:]}")
    run = next(out.rglob("summary.json")).parent
    steps = [r["step_s"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "step_s" in r]
    return json.loads((run / "summary.json").read_text()), steps


def measured(name: str, keys: list[str], tmp: Path) -> dict:
    """One real job and the plan of the same overrides."""
    out = tmp / name.replace(" ", "_")
    summary, steps = _train(keys, out / "default")
    fixed, _ = _train(keys, out / "fixed", FIXED_MMAP)
    planned = _ptune(["plan", *keys, *STEPS, "seq_len=data", "format=json", f"processes={_processes(keys)}"])
    if planned.returncode:
        raise SystemExit(f"ptune plan {' '.join(keys)} failed: {planned.stderr.strip()[-600:]}")
    plan = json.loads(planned.stdout)
    mem, act = plan["memory"], plan["memory"]["activations"]
    peak = mem["peak_memory"] / MB
    step_s = statistics.median(steps[1:] or steps)  # the first step warms up
    return {"row": name, "overrides": keys, "measured_mb": summary["peak_memory_mb"], "plan_mb": round(peak, 1),
            "error": round((peak - summary["peak_memory_mb"]) / summary["peak_memory_mb"], 4),
            "measured_fixed_mmap_mb": fixed["peak_memory_mb"],
            "error_fixed_mmap": round((peak - fixed["peak_memory_mb"]) / fixed["peak_memory_mb"], 4),
            "plan_parts_mb": {"weights": round(mem["frozen_weights"]["total"] / MB, 1),
                              "trainable": round(mem["trainable_state"] / MB, 1),
                              "activations": round(act["total"] / MB, 1),
                              "process": round(mem["baseline"]["process"] / MB, 1),
                              "data": round(mem["baseline"]["data_kept"] / MB, 1),
                              "file_pages": round(mem["frozen_weights"]["file_pages"] / MB, 1),
                              "loading": round(mem["loading"] / MB, 1)},
            "trainable_params": summary["trainable_params"], "plan_trainable": plan["parameters"]["trainable"],
            "total_params": summary["total_params"], "plan_total": plan["parameters"]["total"],
            "micro_batch": f"{plan['job']['batch_size']} x {plan['job']['seq']}",
            "step_s": round(step_s, 3), "plan_tflop": plan["time"]["flops"]["total"] / 1e12,
            "tflops": round(plan["time"]["flops"]["total"] / 1e12 / step_s, 4),
            "plan_step_s": plan["time"]["seconds_per_step"]}


def llama_dirs(tmp: Path) -> dict[str, Path]:
    out = {}
    for name, numbers in LLAMA.items():
        d = tmp / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps({**LLAMA_COMMON, **numbers}, indent=2))
        out[name] = d
    return out


FIT_SETUPS = [  # (label, extra overrides, processes)
    ("bf16", [], 1),
    ("bf16 + ckpt", ["trainer.gradient_checkpointing=true"], 1),
    ("nf4", ["model.quantize=nf4"], 1),
    ("int4 + ckpt", ["model.quantize=int4", "trainer.gradient_checkpointing=true"], 1),
    ("int8 + ckpt", ["model.quantize=int8", "trainer.gradient_checkpointing=true"], 1),
    ("fsdp x8", ["trainer.shard=fsdp"], 8),
    ("fsdp x8 + ckpt", ["trainer.shard=fsdp", "trainer.gradient_checkpointing=true"], 8),
]
DEVICES = ("24GiB", "80GiB", "141GiB")


def fit_rows(dirs: dict[str, Path], methods: list[str]) -> list[dict]:
    from ptune.train import memory_plan

    rows = []
    for name, d in dirs.items():
        for method in methods:
            for label, extra, procs in FIT_SETUPS:
                keys = ["model=llama", f"model.name_or_path={d}", f"method={method}", "task=e2e", "trainer.batch_size=8",
                        "trainer.precision=bf16", *extra, "seq_len=512", "device=cuda", f"processes={procs}"]
                plans = {dev: memory_plan.plan([*keys, f"device_memory={dev}"]) for dev in DEVICES}
                p = plans[DEVICES[0]]
                rows.append({"model": name, "method": method, "setup": label, "processes": procs,
                             "params_b": p["parameters"]["total"] / 1e9, "trainable": p["parameters"]["trainable"],
                             "weights_gib": p["memory"]["frozen_weights"]["total"] / GiB,
                             "activations_gib": p["memory"]["activations"]["total"] / GiB,
                             "step_gib": p["memory"]["training_step"] / GiB, "load_gib": p["memory"]["loading"] / GiB,
                             "tflop_per_step": p["time"]["flops"]["total"] / 1e12,
                             "fits": {dev: _fit_word(plans[dev]) for dev in DEVICES}})
    return rows


def _fit_word(plan: dict) -> str:
    """yes | step only (the load's fp32 model does not fit) | no"""
    limit = plan["device_memory"] - 2**30  # the plan's CUDA reserve
    step_ok = plan["memory"]["training_step"] <= limit
    load_ok = plan["memory"]["loading"] <= limit
    return "yes" if plan["fits"] else "step only" if step_ok and not load_ok else "no"


def markdown(result: dict) -> str:
    lines = [f"# `ptune plan` against measured runs ({result['date']})", "",
             f"`python scripts/bench_plan.py {result['argv']}`; {result['machine']}; every job 3 steps, its own process; "
             "the plan with the same overrides and seq_len=data, its own process.", ""]
    lines += [] if not result["rows"] else [
             "| row | micro-batch | plan MB | measured MB (glibc default) | error | measured MB (fixed mmap threshold) | "
             "error | plan: weights / activations / process + data MB | trainable (plan = run) | s/step | TFLOPS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        parts = r["plan_parts_mb"]
        same = "yes" if r["plan_trainable"] == r["trainable_params"] and r["plan_total"] == r["total_params"] else "NO"
        lines.append(f"| {r['row']} | {r['micro_batch']} | {r['plan_mb']:,.1f} | {r['measured_mb']:,.1f} | "
                     f"{100 * r['error']:+.1f}% | {r['measured_fixed_mmap_mb']:,.1f} | {100 * r['error_fixed_mmap']:+.1f}% | "
                     f"{parts['weights']:,.1f} / {parts['activations']:,.1f} / "
                     f"{parts['process']:,.1f} + {parts['data']:,.1f} | {r['trainable_params']:,} ({same}) | "
                     f"{r['step_s']} | {r['tflops']} |")
    if result["rows"]:
        worst = max(result["rows"], key=lambda r: abs(r["error"]))
        fixed = max(result["rows"], key=lambda r: abs(r["error_fixed_mmap"]))
        lines += ["", f"Largest error against glibc's default: {100 * worst['error']:+.1f}% ({worst['row']}); "
                      f"{sum(abs(r['error']) <= 0.15 for r in result['rows'])} of {len(result['rows'])} rows within 15%. "
                      f"Against a fixed mmap threshold (MALLOC_MMAP_THRESHOLD_=131072): {100 * fixed['error_fixed_mmap']:+.1f}% "
                      f"({fixed['row']}); {sum(abs(r['error_fixed_mmap']) <= 0.15 for r in result['rows'])} of "
                      f"{len(result['rows'])} within 15%."]
    if result.get("fit"):
        lines += ["", "## What fits where (plan only: bf16, batch 8 x 512 tokens, E2E's 65 label rows per row; per process)",
                  "", "| model | method | setup | weights GiB | activations GiB | step GiB | load GiB | "
                  + " | ".join(result["devices"]) + " |", "|---|---|---|---|---|---|---|" + "---|" * len(result["devices"])]
        for r in result["fit"]:
            lines.append(f"| {r['model']} | {r['method']} | {r['setup']} | {r['weights_gib']:.1f} | "
                         f"{r['activations_gib']:.1f} | {r['step_gib']:.1f} | {r['load_gib']:.1f} | "
                         + " | ".join(r["fits"][d] for d in result["devices"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny-llama rows and Llama-3.2-1B fit rows only")
    ap.add_argument("--rows", default="", help="only the measured rows whose name contains this")
    ap.add_argument("--skip-fit", action="store_true")
    ap.add_argument("--skip-measured", action="store_true")
    ap.add_argument("--out", default=f"bench/plan-{time.strftime('%Y-%m-%d')}")
    args = ap.parse_args(argv)
    rows = [(n, k) for n, k in ROWS if args.rows in n and (not args.quick or n.startswith("tiny-llama"))]
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "argv": " ".join(sys.argv[1:] if argv is None else argv),
              "machine": f"{os.cpu_count()} cores, {platform.platform()}, OMP_NUM_THREADS={ENV['OMP_NUM_THREADS']}",
              "rows": [], "devices": list(DEVICES)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, keys in ([] if args.skip_measured else rows):
            result["rows"].append(measured(name, keys, Path(tmp)))
            r = result["rows"][-1]
            print(f"{name}: plan {r['plan_mb']:.1f} MB; measured {r['measured_mb']:.1f} MB ({100 * r['error']:+.1f}%), "
                  f"fixed mmap threshold {r['measured_fixed_mmap_mb']:.1f} MB ({100 * r['error_fixed_mmap']:+.1f}%)", flush=True)
        if not args.skip_fit:
            dirs = llama_dirs(Path(tmp))
            if args.quick:
                dirs = {k: v for k, v in dirs.items() if k.endswith("1B")}
            result["fit"] = fit_rows(dirs, ["prompt"] if args.quick else ["prompt", "prefix"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
