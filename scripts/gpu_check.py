"""The prepared GPU check of issue 28: what only a GPU can tell, in one run (scripts/gpu_check.sh wraps it).

    python scripts/gpu_check.py [--cpu] [--sections contract,speed,peft,quantize,shard] [--out DIR]

contract  tests/test_contract.py's device test: each method x tiny backbone computes on the GPU what it computes
          on the CPU (outputs, loss, the trained tensors' gradients; fp32, 1e-4).
speed     bf16 training tokens/s and MFU of prompt and prefix tuning on random-init Llama configs of ~1B
          (Llama-3.2-1B's shape) and ~8B (Llama-3.1-8B's) parameters, E2E, batch 32 (smaller under --cpu).
peft      ptune against PEFT + transformers' Trainer on the same ~1B job (scripts/bench.py's two jobs: the
          same weights, tokenizer, examples, batch, steps, lr, precision).
quantize  the ~1B prefix job with model.quantize=none / int8 / nf4 (+ int4 on CUDA): losses, memory, time
          (scripts/bench_big_backbones.py's section, at this script's batch and steps).
shard     trainer.shard=fsdp: 1 process, 2 unsharded, 2 sharded (scripts/bench_big_backbones.py's job): on 2 GPUs
          where there are; on one GPU NCCL cannot put two ranks on one device, so it runs on the CPU with gloo
          (said in the report).

MFU = model FLOPs / time / peak: a frozen backbone costs 4N FLOPs per token (forward 2N, backward through the
activations 2N; no weight gradients), N its non-embedding parameters, prompt tokens counted as tokens; the
peak is the card's dense bf16 rate where it is known (H100 / H200 SXM: 989 TFLOP/s) and, beside it, this
device's measured bf16 matmul rate. --cpu: everything on the CPU at small sizes (Llama shapes of ~7M / ~25M
parameters, 4 steps), so the script is proven end to end where no GPU is lent; its numbers say nothing about
a GPU. Writes DIR/gpu-check.md and DIR/gpu-check.json ($OUT on the device machine, else bench/).
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

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench  # noqa: E402  scripts/bench.py: ptune's and PEFT's jobs
import bench_big_backbones as big  # noqa: E402  one `ptune train` per process, sharded or quantized

# Llama shapes; the vocabulary is SmolLM2's tokenizer's (49,152), the one ptune's random-init models borrow.
SIZES = {
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, tie_word_embeddings=True),  # Llama-3.2-1B
    "llama-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=14336, tie_word_embeddings=False),  # Llama-3.1-8B
    "llama-cpu-s": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=512, tie_word_embeddings=True),
    "llama-cpu-m": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                        intermediate_size=1536, tie_word_embeddings=False),
}
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # dense bf16 FLOP/s (SXM data sheets)


def model_keys(size: str) -> list[str]:
    return ["model=tiny-llama", "model.tiny.max_position_embeddings=2048",
            *(f"model.tiny.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in SIZES[size].items())]


def non_embedding_params(size: str) -> int:
    s = SIZES[size]
    h, kv = s["hidden_size"], s["num_key_value_heads"] * s["hidden_size"] // s["num_attention_heads"]
    return s["num_hidden_layers"] * (2 * h * h + 2 * h * kv + 3 * h * s["intermediate_size"])


def matmul_flops(cuda: bool) -> float:
    """This device's bf16 matmul rate: best of 10 products (8192^3 on a GPU, 1024^3 on the CPU)."""
    n, dev = (8192, "cuda") if cuda else (1024, "cpu")
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    best = float("inf")
    for i in range(13):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        if i >= 3:
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def section_contract(args, cuda: bool) -> dict:
    env = {**os.environ, "PTUNE_CONTRACT_DEVICE": "cuda" if cuda else "cpu", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_contract.py", "-k",
                        "device_computes"], cwd=ROOT, env=env, capture_output=True, text=True)
    last = (p.stdout.strip().splitlines() or ["(no output)"])[-1]
    failed = [line for line in p.stdout.splitlines() if line.startswith("FAILED")]
    return {"device": env["PTUNE_CONTRACT_DEVICE"], "passed": p.returncode == 0, "summary": last, "failed": failed[:20],
            "s": round(time.perf_counter() - t0, 1)}


def spec(size: str, method: str, tool: str, steps: int, batch: int) -> dict:
    return dict(model="tiny-llama", model_extra=model_keys(size), task="e2e", batch_size=batch, steps=steps, lr=1e-3,
                eval_samples=4, max_new_tokens=16, train_samples=batch * steps, dev_loss_samples=0, metric="bleu",
                tool=tool, method=method, precision="bf16", loss_window=min(5, steps), seed=42)


def throughput(result: dict, size: str, batch: int, peaks: dict) -> dict:
    """tokens/s over the median step (the first steps warm caches and kernels up) and MFU against each peak."""
    if "error" in result:
        return result
    steps = len(result["step_s"])
    tokens_per_step = result["tokens"] / steps
    step = statistics.median(result["step_s"])
    flops = 4 * non_embedding_params(size) * (tokens_per_step + batch * result["extra_tokens_per_example"]) / step
    return {"tokens_per_s": tokens_per_step / step, "step_s": step, "loss": result["loss"],
            "peak_memory_mb": result.get("peak_memory_mb"), "trainable_params": result["trainable_params"],
            **{f"mfu_{name}": flops / peak for name, peak in peaks.items() if peak}}


def section_speed(args, cuda: bool, peaks: dict) -> list[dict]:
    rows = []
    for size in args.sizes:
        for method in ("prompt", "prefix"):
            r = bench.run_job(spec(size, method, "ptune", args.steps, args.batch), in_process=not cuda)
            rows.append({"size": size, "method": method, "non_embedding_params": non_embedding_params(size),
                         **throughput(r, size, args.batch, peaks)})
            print(f"speed {size} {method}: {rows[-1]}", flush=True)
    return rows


def section_peft(args, cuda: bool, peaks: dict, speed: list[dict]) -> list[dict]:
    """PEFT + Trainer on the first size; ptune's rows of the same jobs come from `speed` where it ran."""
    rows, size = [], args.sizes[0]
    for method in ("prompt", "prefix"):
        for tool in ("ptune", "peft"):
            done = [r for r in speed if (r["size"], r["method"]) == (size, method)]
            if tool == "ptune" and done:
                rows.append({**done[0], "tool": "ptune"})
                continue
            # --cpu: jobs in this process (no interpreter start-up each); on a GPU each its own process
            r = bench.run_job(spec(size, method, tool, args.steps, args.batch), in_process=not cuda)
            rows.append({"size": size, "method": method, "tool": tool, **throughput(r, size, args.batch, peaks)})
            print(f"peft {size} {method} {tool}: {rows[-1]}", flush=True)
    return rows


def section_quantize(args, cuda: bool, tmp: Path) -> list[dict]:
    """The first size's prefix job on E2E through each quantization (+ int4 on CUDA: torchao's tinygemm kernel)."""
    return big.quantize_section(tmp, model_keys(args.sizes[0]), args.steps, ("e2e",),
                                ("none", "int8", "nf4", *(["int4"] if cuda else [])), args.batch, cuda,
                                ("task.max_eval_samples=4", "task.max_new_tokens=16"))


def section_shard(args, cuda: bool, tmp: Path) -> tuple[str, list[dict]]:
    """On 2 GPUs where there are; on one GPU NCCL cannot put two ranks on one device: the CPU, 2 gloo processes."""
    on_gpus = cuda and torch.cuda.device_count() >= 2
    size = args.sizes[0] if on_gpus else "llama-cpu-s"
    where = ("2 GPUs, NCCL" if on_gpus else
             "the CPU, 2 gloo processes" + (" (one GPU: NCCL cannot put two ranks on one device)" if cuda else ""))
    return f"{size} on {where}", big.shard_section(tmp, model_keys(size), min(args.steps, 4), on_gpus)


def markdown(r: dict) -> str:
    lines = [f"# GPU check {r['date']}", "", f"`{r['command']}`; {r['device']}; torch {r['torch']}; "
             f"{r['wall_s']:.0f} s in all.", "",
             "bf16 matmul peak: " + ", ".join(f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in r["peaks"].items() if v), ""]
    if "contract" in r:
        c = r["contract"]
        lines += ["## contract: the GPU computes what the CPU computes", "",
                  f"device {c['device']}: {'passed' if c['passed'] else 'FAILED'} ({c['summary']}, {c['s']} s)"]
        lines += [f"- {f}" for f in c["failed"]] + [""]
    mfu_cols = [k for k in r["peaks"] if r["peaks"][k]]
    for name, title in (("speed", "## speed: bf16 training, random-init Llama, E2E"),
                        ("peft", "## ptune against PEFT + Trainer, the same job")):
        if name not in r:
            continue
        lines += [title, "", "| size | method | tool | tokens/s | s/step | peak MB | loss | "
                  + " | ".join(f"MFU ({k})" for k in mfu_cols) + " |", "|---" * (7 + len(mfu_cols)) + "|"]
        for row in r[name]:
            if "error" in row:
                lines.append(f"| {row['size']} | {row['method']} | {row.get('tool', 'ptune')} | error: "
                             f"{row['error'][-160:]} |")
                continue
            lines.append(f"| {row['size']} | {row['method']} | {row.get('tool', 'ptune')} | {row['tokens_per_s']:.0f} | "
                         f"{row['step_s']:.3f} | {row['peak_memory_mb'] or 0:.0f} | {row['loss']:.4f} | "
                         + " | ".join(f"{row.get('mfu_' + k, 0):.1%}" for k in mfu_cols) + " |")
        lines.append("")
    if "quantize" in r:
        lines += big.quantize_markdown(r["quantize"], r["steps"], r["batch"])
    if "shard" in r:
        lines += big.shard_markdown(r["shard"], min(r["steps"], 4), f"; {r['shard_where']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="everything on the CPU at small sizes (no GPU needed)")
    ap.add_argument("--sections", default="contract,speed,peft,quantize,shard")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench"))
    args = ap.parse_args(argv)
    if args.cpu:  # before anything asks torch about CUDA: the jobs in this process and in subprocesses see none
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    cuda = not args.cpu and torch.cuda.is_available()
    if not cuda and not args.cpu:
        raise SystemExit("gpu_check: no CUDA device here; run it on a GPU machine, or with --cpu to prove it runs")
    args.sizes = ["llama-1b", "llama-8b"] if cuda else ["llama-cpu-s", "llama-cpu-m"]
    args.steps, args.batch = (20, 32) if cuda else (4, 4)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shared = ROOT.parent / "shared" / "data"
    if "PTUNE_DATA_DIR" not in os.environ and shared.is_dir():
        os.environ["PTUNE_DATA_DIR"] = str(shared)
    name = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    peaks = {"measured": matmul_flops(cuda)}
    peaks["data sheet"] = next((v for k, v in PEAK_BF16.items() if cuda and k in name), None)
    sections = args.sections.split(",")
    t0 = time.perf_counter()
    r = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": "python scripts/gpu_check.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "device": name, "torch": torch.__version__, "peaks": peaks,
         "steps": args.steps, "batch": args.batch}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write():
        r["wall_s"] = time.perf_counter() - t0
        (out / "gpu-check.json").write_text(json.dumps(r, indent=2) + "\n")
        (out / "gpu-check.md").write_text(markdown(r))

    with tempfile.TemporaryDirectory() as tmp:
        for section in sections:
            t = time.perf_counter()
            if section == "contract":
                r["contract"] = section_contract(args, cuda)
            elif section == "speed":
                r["speed"] = section_speed(args, cuda, peaks)
            elif section == "peft":
                r["peft"] = section_peft(args, cuda, peaks, r.get("speed", []))
            elif section == "quantize":
                r["quantize"] = section_quantize(args, cuda, Path(tmp))
            elif section == "shard":
                r["shard_where"], r["shard"] = section_shard(args, cuda, Path(tmp))
            else:
                raise SystemExit(f"gpu_check: unknown section {section!r}")
            print(f"-- {section}: {time.perf_counter() - t:.0f} s", flush=True)
            write()  # after every section: a check cut off at its limit keeps what it measured
    print(markdown(r))
    ok = (r.get("contract", {}).get("passed", True) and not big.failed(r)
          and not any("error" in row for name in ("speed", "peft") for row in r.get(name, [])))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
