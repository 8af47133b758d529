#!/usr/bin/env python
"""One prefix-tuning training step (forward + backward) on SmolLM2-135M under each attention
implementation and precision: the measurement behind `trainer.attention=auto` (ptune.train.attention).

    .venv/bin/python scripts/probe_attention.py                 # seq 60 (E2E batches), 128, 256
    .venv/bin/python scripts/probe_attention.py --lengths 128

One torch thread, and the step's cost is read from the thread's CPU time (time.thread_time), so
that other load on a shared machine changes it little; each configuration runs in its own
subprocess; the minimum of 3 steps after a warm-up. Length "e2e" is the real E2E training batch
(8 rows of ~60 tokens, loss on the sentence); a number L is 8 rows of L random tokens, loss on the
second half.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def step_cost(precision: str, attn: str, length: str) -> float:
    import torch

    torch.set_num_threads(1)
    from ptune import heads, models
    from ptune.cli import compose
    from ptune.data import collate
    from ptune.build import build

    cfg = compose(["method=prefix", "model=smollm2-135m", "task=e2e", "task.max_train_samples=400",
                   f"trainer.attention={attn}"])
    backbone, method, task = build(cfg)
    if length == "e2e":
        ex = sorted(task.train_examples(backbone.tokenizer, backbone.kind), key=lambda e: len(e.input_ids))
        batches = [collate(ex[i:i + 8], backbone.tokenizer.pad_token_id) for i in range(100, 132, 8)]
    else:
        g = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(4):
            ids = torch.randint(100, 40000, (8, int(length)), generator=g)
            labels = ids.clone()
            labels[:, : int(length) // 2] = -100
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    if precision == "bf16":
        models.store_frozen(backbone.model, torch.bfloat16)
    backbone.model.train()
    costs = []
    for batch in batches:
        t0 = time.thread_time()
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = heads.loss(method, batch)
        loss.backward()
        costs.append(time.thread_time() - t0)
    return min(costs[1:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="e2e,128,256")
    ap.add_argument("--precisions", default="fp32,bf16")
    a = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.setdefault("PTUNE_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    print("| precision | tokens per row | sdpa s/step | eager s/step | eager / sdpa |\n|---|---|---|---|---|")
    for precision in a.precisions.split(","):
        for length in a.lengths.split(","):
            cost = {}
            for attn in ("sdpa", "eager"):
                out = subprocess.run([sys.executable, __file__, "_one", precision, attn, length], env=env,
                                     capture_output=True, text=True)
                cost[attn] = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else float("nan")
            print(f"| {precision} | {length} | {cost['sdpa']:.2f} | {cost['eager']:.2f} | "
                  f"{cost['eager'] / cost['sdpa']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "_one":
        print(json.dumps(step_cost(*sys.argv[2:])))
        sys.exit(0)
    sys.exit(main())
