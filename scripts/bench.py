#!/usr/bin/env python
"""ptune against Hugging Face PEFT + transformers Trainer, side by side, on the same job.

    .venv/bin/python scripts/bench.py                       # smollm2-135m on E2E, every method, fp32
    .venv/bin/python scripts/bench.py --quick               # tiny-llama, a few steps (CI: it runs, < 1 min)
    .venv/bin/python scripts/bench.py --methods prefix --precisions fp32,bf16 --steps 40 --rounds 3

For each method and precision the two tools run alternately, A B A B ... (`--rounds` pairs), each
job in its own subprocess (so its peak RSS is its own and nothing is cached between jobs), so that
drift on a shared machine hits both alike; the table reports each tool's median over its rounds.

Same job for both: the same backbone weights and tokenizer (ptune's model loader), the same
tokenized training examples (ptune's task), batch size, number of optimizer steps, learning rate,
method hyper-parameters and precision. Differences that are the tools' own and are the point of
the comparison: ptune's loop, batching (length-grouped, dynamic padding) and method code against
PEFT's model wrappers under Trainer at its defaults (random sampler, padding per batch).

The eval metric after training comes from ONE evaluator, ptune's: PEFT's trained tensors are read
out of its model (for prefix-tuning through its MLP, collapsed) and loaded into a ptune method of
the same shape, then decoded and scored exactly as ptune's own run. "Loss" is the mean training
loss of the last `--loss-window` steps as each tool logs it (token-level cross-entropy).

The floor: forward-only tokens/s of the same backbone on the same batches (no autograd), and this
machine's measured matmul GFLOP/s (2048 x 2048, fp32 and bf16). Each row's roofline fraction is
its FLOP rate over the matmul peak of its precision, with FLOPs per token 4*N for a frozen
backbone (forward 2N + backward through activations 2N) and 6*N for fine-tuning (+ weight
gradients), N = the backbone's parameters without the input embedding table (Kaplan et al.'s
non-embedding count: a lookup is no matmul; a tied LM head, used as a matmul only where labels
are, is thereby left out too, so the fraction is of useful work); prompt tokens that lengthen the
sequence (prompt, p-tuning) are counted as tokens too.

Writes bench/<date>.md and bench/<date>.json (or --out PREFIX).
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
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIGS = {
    # name: model, task, batch, steps, lr, eval examples (E2E: MRs), new tokens, training rows (a deterministic
    # subset, the same for both), dev examples for the dev loss (the same for both), the eval metric
    "smollm2-e2e": dict(model="smollm2-135m", task="e2e", batch_size=8, steps=30, lr=1e-3, eval_samples=20,
                        max_new_tokens=64, train_samples=4000, dev_loss_samples=200, metric="bleu"),
    "minilm-sst2": dict(model="minilm", task="sst2", batch_size=16, steps=60, lr=5e-3, eval_samples=400,
                        train_samples=4000, dev_loss_samples=400, metric="accuracy"),
    "tiny": dict(model="tiny-llama", task="e2e", batch_size=4, steps=4, lr=1e-3, eval_samples=4, max_new_tokens=8,
                 train_samples=64, dev_loss_samples=8, metric="bleu"),
    "tiny-sst2": dict(model="tiny-bert", task="sst2", batch_size=4, steps=4, lr=5e-3, eval_samples=8,
                      train_samples=64, dev_loss_samples=8, metric="accuracy"),
}
METHODS = ("prompt", "prefix", "p-tuning", "p-tuning-v2", "fine-tune")
FINE_TUNE_LR = 5e-5  # full fine-tuning at 1e-3 diverges; both tools get this one


# ------------------------------------------------------------------------------------------------
# the two jobs (each runs in a fresh subprocess: `bench.py _job <spec json>`)
# ------------------------------------------------------------------------------------------------
def _compose(spec: dict, out_dir: str):
    from ptune.cli import compose

    lr = FINE_TUNE_LR if spec["method"] == "fine-tune" else spec["lr"]
    n = spec["steps"]
    generation = ([f"task.max_new_tokens={spec['max_new_tokens']}", "task.metrics=[bleu]"]
                  if "max_new_tokens" in spec else [])
    # model_extra: both tools' backbone (a random-init size: model.tiny.*=..., scripts/gpu_check.py); ptune_extra: ptune's
    extra = [*spec.get("model_extra", []), *(spec.get("ptune_extra", []) if spec["tool"] == "ptune" else [])]
    return compose([f"method={spec['method']}", f"model={spec['model']}", f"task={spec['task']}",
                    f"trainer.max_steps={n}", f"trainer.eval_every={n}", f"trainer.save_every={n}",
                    f"trainer.batch_size={spec['batch_size']}", f"trainer.lr={lr}", "trainer.log_every=1",
                    f"trainer.precision={spec['precision']}", "trainer.keep_last=1", "trainer.warmup_steps=0",
                    f"task.max_eval_samples={spec['eval_samples']}", f"task.max_train_samples={spec['train_samples']}",
                    *generation, f"output_dir={out_dir}", f"trainer.seed={spec.get('seed', 42)}", *extra])


def _dev_examples(task, tokenizer, kind: str, n: int):
    """The first n dev examples with their targets, encoded as training examples are (the same for both tools)."""
    if task.name == "e2e":
        from ptune.generate import encode_sources, target_examples

        rows = task.rows("dev")[:n]
        src = encode_sources(tokenizer, [task.source(mr) for mr, _ in rows], task.max_source_len, kind)
        return target_examples(tokenizer, src, [ref for _, ref in rows], task.max_target_len, kind)
    return task.examples(tokenizer, task.rows("dev")[:n])


def dev_loss(method, examples, batch_size: int = 16) -> float:
    """Mean token (E2E) or example (classification) cross-entropy of a ptune method on fixed dev examples,
    fp32, dropout off: the loss after N steps, measured the same way for both tools."""
    import torch

    from ptune import heads
    from ptune.data import collate

    model = method.backbone.model
    model.eval()
    method.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i:i + batch_size], method.backbone.tokenizer.pad_token_id)
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss, n = heads.loss(method, batch)
            total, count = total + float(loss), count + n
    return total / count


def job_ptune(spec: dict) -> dict:
    from ptune.build import load_trained
    from ptune.train.job import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _compose(spec, tmp)
        result = train(cfg)
        peak = _peak_rss_mb()  # training and its evaluation; what follows is the bench's own measurement
        run = Path(result["run_dir"])
        summary = result["summary"]
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        train_steps = [r for r in steps if "loss" in r]
        loss_dev = None  # dev_loss_samples=0: none (a backbone too big to load again in fp32 on the CPU)
        if spec["dev_loss_samples"]:
            cfg.trainer.precision = "fp32"  # the dev loss in fp32 for both tools
            backbone, method, task = load_trained(run, cfg)
            loss_dev = dev_loss(method, _dev_examples(task, backbone.tokenizer, backbone.kind, spec["dev_loss_samples"]))
    window = train_steps[-spec["loss_window"]:]
    return dict(trainable_params=summary["trainable_params"], tokens=summary["train_tokens"],
                train_time_s=summary["train_time_s"], step_s=[r["step_s"] for r in train_steps],
                loss=statistics.mean(r["loss"] for r in window), eval=summary["eval"].get(spec["metric"]),
                dev_loss=loss_dev, peak_rss_mb=peak, extra_tokens_per_example=_extra_tokens(cfg),
                peak_memory_mb=summary["peak_memory_mb"])  # on a GPU torch.cuda.max_memory_allocated, else RSS


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _extra_tokens(cfg) -> int:
    """Virtual tokens that lengthen every sequence (prompt and p-tuning prepend theirs)."""
    return int(cfg.method.get("num_virtual_tokens", 0)) if cfg.method.name in ("prompt", "p-tuning") else 0


def _peft_config(cfg, model, task_type: str = "CAUSAL_LM"):
    import peft

    m = cfg.method
    common = dict(task_type=task_type, num_virtual_tokens=int(m.get("num_virtual_tokens", 0)))
    if m.name == "prompt":
        return peft.PromptTuningConfig(**common)  # PEFT's default init (random N(0,1) rows)
    if m.name == "prefix":
        return peft.PrefixTuningConfig(**common, prefix_projection=bool(m.projection), encoder_hidden_size=int(m.mid_dim))
    if m.name == "p-tuning-v2":
        return peft.PrefixTuningConfig(**common, prefix_projection=False)
    if m.name == "p-tuning":
        kind = "LSTM" if m.encoder == "lstm" else "MLP"
        hidden = m.get("encoder_hidden_size") or model.config.hidden_size
        return peft.PromptEncoderConfig(**common, encoder_reparameterization_type=kind, encoder_hidden_size=int(hidden))
    return None  # fine-tune: the plain model under Trainer


def _sequence_classifier(backbone, n_labels: int):
    """BertForSequenceClassification around ptune's loaded encoder (the same tensors, no second copy):
    what a PEFT user trains for SST-2 (task_type SEQ_CLS: pooler + a new classifier, saved with the adapter)."""
    import torch
    from torch import nn
    from transformers import AutoModelForSequenceClassification

    config = backbone.model.config
    config.num_labels = n_labels
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    model.bert = backbone.model.base_model  # BertModel (minilm) or the encoder inside BertForMaskedLM (tiny-bert)
    if getattr(model.bert, "pooler", None) is None:  # an MLM checkpoint has none: transformers would init a new one
        from transformers.models.bert.modeling_bert import BertPooler

        model.bert.pooler = BertPooler(config)
        nn.init.normal_(model.bert.pooler.dense.weight, std=config.initializer_range)
        nn.init.zeros_(model.bert.pooler.dense.bias)
    model.dropout = nn.Dropout(config.hidden_dropout_prob)
    model.classifier = nn.Linear(config.hidden_size, n_labels)  # transformers' init: N(0, 0.02), zero bias
    nn.init.normal_(model.classifier.weight, std=config.initializer_range)
    nn.init.zeros_(model.classifier.bias)
    return model


def job_peft(spec: dict) -> dict:
    import torch
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    import peft
    from ptune.build import build

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _compose(spec, tmp)
        torch.manual_seed(cfg.trainer.seed)
        backbone, method, task = build(cfg)  # same weights, tokenizer, data; `method` is ptune's evaluator
        tok = backbone.tokenizer
        examples = task.train_examples(tok, backbone.kind)
        classify = backbone.kind in ("encoder", "masked")
        if classify:  # one label per example: the sequence classifier's `labels`
            model = _sequence_classifier(backbone, len(task.labels))
            rows = [dict(input_ids=e.input_ids, attention_mask=[1] * len(e.input_ids), labels=e.labels[0])
                    for e in examples]
            pad = DataCollatorWithPadding(tok)
        else:
            model = backbone.model
            rows = [dict(input_ids=e.input_ids, attention_mask=[1] * len(e.input_ids), labels=e.labels)
                    for e in examples]
            pad = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
        pconf = _peft_config(cfg, model, "SEQ_CLS" if classify else "CAUSAL_LM")
        if pconf is None:
            for p in model.parameters():
                p.requires_grad_(True)
            trained = model
        else:
            for p in model.parameters():
                p.requires_grad_(False)
            trained = peft.get_peft_model(model, pconf)
        trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)

        counted = {"tokens": 0}

        def collate(batch):
            out = pad(batch)
            counted["tokens"] += int(out["attention_mask"].sum())
            return out

        class Clock(TrainerCallback):
            def __init__(self):
                self.step_s, self.losses, self._t = [], [], None

            def on_step_begin(self, args, state, control, **kw):
                self._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                self.step_s.append(time.perf_counter() - self._t)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    self.losses.append(logs["loss"])

        clock = Clock()
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=spec["batch_size"], max_steps=spec["steps"],
                                 learning_rate=cfg.trainer.lr, logging_steps=1, save_strategy="no", report_to=[],
                                 bf16=spec["precision"] == "bf16", fp16=spec["precision"] == "fp16",
                                 seed=cfg.trainer.seed, dataloader_num_workers=0, disable_tqdm=True,
                                 use_cpu=not torch.cuda.is_available(), remove_unused_columns=False)
        Trainer(model=trained, args=args, train_dataset=rows, data_collator=collate, callbacks=[clock]).train()
        peak_memory = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else _peak_rss_mb()

        trained.eval()
        dev = _dev_examples(task, tok, backbone.kind, spec["dev_loss_samples"]) if spec["dev_loss_samples"] else []
        if classify:  # PEFT's own model scores itself: its classifier reads the pooler, which ptune's head has not
            score = _peft_accuracy(trained, task, tok, spec["eval_samples"])
            peak = _peak_rss_mb()
            loss_dev = _peft_class_dev_loss(trained, dev, tok)
        else:  # one evaluator: PEFT's trained tensors into ptune's method, scored by ptune's task
            method.to(next(model.parameters()).device)  # Trainer moved the backbone (to a GPU where there is one)
            with torch.no_grad():
                if cfg.method.name in ("prompt", "p-tuning"):
                    method.load_adapter_tensors({"prompt": trained.get_prompt_embedding_to_save("default").float()})
                elif cfg.method.name in ("prefix", "p-tuning-v2"):
                    enc = trained.prompt_encoder["default"]
                    # (p, L * 2 * kv_dim), collapsed
                    flat = enc(torch.arange(method.num_virtual_tokens, device=next(enc.parameters()).device)[None])[0].float()
                    method.load_adapter_tensors({next(iter(method.adapter_tensors())): flat})
            scores, _ = task.evaluate(method, "dev", cfg.trainer.eval_batch_size)
            score = scores.get(spec["metric"])
            peak = _peak_rss_mb()
            loss_dev = dev_loss(method, dev) if dev else None
    window = clock.losses[-spec["loss_window"]:]
    return dict(trainable_params=trainable, tokens=counted["tokens"], train_time_s=sum(clock.step_s),
                step_s=clock.step_s, loss=statistics.mean(window), eval=score, dev_loss=loss_dev, peak_rss_mb=peak,
                peak_memory_mb=peak_memory,
                extra_tokens_per_example=_extra_tokens(cfg))


def _peft_batches(examples, tok, batch_size: int = 16):
    import torch

    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, e in enumerate(chunk):
            ids[r, :len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[r, :len(e.input_ids)] = 1
        yield ids, mask, torch.tensor([e.labels[0] for e in chunk])


def _peft_accuracy(model, task, tok, n: int) -> float:
    import torch

    from ptune.data import subsample

    rows = task.rows("dev")
    rows = [rows[i] for i in subsample(len(rows), n, task.subsample_seed)]  # the rows ptune's evaluate scores
    right = 0
    with torch.no_grad():
        for ids, mask, labels in _peft_batches(task.examples(tok, rows), tok):
            right += int((model(input_ids=ids, attention_mask=mask).logits.argmax(-1) == labels).sum())
    return right / len(rows)


def _peft_class_dev_loss(model, examples, tok) -> float:
    import torch
    import torch.nn.functional as F

    total = 0.0
    with torch.no_grad():
        for ids, mask, labels in _peft_batches(examples, tok):
            logits = model(input_ids=ids, attention_mask=mask).logits
            total += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
    return total / len(examples)


def job_floor(spec: dict) -> dict:
    """Forward-only tokens/s of the frozen backbone on the training batches, and its size."""
    import torch

    from ptune.data import collate
    from ptune.build import build

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _compose({**spec, "method": "fine-tune"}, tmp)
        backbone, _, task = build(cfg)
    model = backbone.model.eval()
    examples = task.train_examples(backbone.tokenizer, backbone.kind)[: spec["batch_size"] * spec["steps"]]
    n_params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied matrix once
    n_embedding = model.get_input_embeddings().weight.numel()
    bs, tokens, t = spec["batch_size"], 0, 0.0
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=spec["precision"] == "bf16"):
        for i in range(0, len(examples), bs):
            batch = collate(examples[i:i + bs], backbone.tokenizer.pad_token_id)
            t0 = time.perf_counter()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            t += time.perf_counter() - t0
            tokens += int(batch["attention_mask"].sum())
    return dict(forward_tokens_per_s=tokens / t, backbone_params=n_params, embedding_params=n_embedding,
                mean_tokens_per_example=tokens / len(examples))


def matmul_gflops(dtype_name: str, n: int = 2048, reps: int = 10) -> float:
    import torch

    dtype = getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype_name])
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def job_scale(spec: dict) -> dict:
    """ptune's training step alone on fixed-shape batches: `batch` rows of `seq_len` E2E tokens (the text of the
    training examples run together and cut), loss on the second half of each row (as E2E's table, then its
    sentence), `method` with `num_virtual_tokens`; the median of `steps` timed steps after one warm-up, and the
    memory: peak RSS of this process and its growth over the RSS with the model loaded (activations, gradients,
    optimizer state)."""
    import torch

    from ptune import heads, models
    from ptune.build import build

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _compose({**spec, "tool": "ptune",
                        "ptune_extra": [*spec.get("ptune_extra", []), f"method.num_virtual_tokens={spec['p']}"]}, tmp)
        backbone, method, task = build(cfg)
    if spec["precision"] == "bf16":
        models.store_frozen(backbone.model, torch.bfloat16)
    stream = [t for e in task.train_examples(backbone.tokenizer, backbone.kind)[:2000] for t in e.input_ids]
    bs, length = spec["batch"], spec["seq_len"]
    need = bs * length * (spec["steps"] + 1)
    stream = (stream * (need // len(stream) + 1))[:need]
    ids = torch.tensor(stream).view(spec["steps"] + 1, bs, length)
    labels = ids.clone()
    labels[:, :, : length // 2] = -100
    params = list(method.trainable_tensors().values())
    opt = torch.optim.AdamW(params, lr=1e-4)
    backbone.model.train()
    rss_loaded = _rss_now_mb()
    times = []
    for i in range(spec["steps"] + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=spec["precision"] == "bf16"):
            loss, _ = heads.loss(method, {"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]),
                                          "labels": labels[i]})
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:])
    peak = _peak_rss_mb()
    return dict(step_s=step_s, tokens_per_s=bs * length / step_s, peak_rss_mb=peak, step_memory_mb=peak - rss_loaded,
                trainable_params=sum(p.numel() for p in params))


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


SCALING = {  # axis: (values, the other two fixed)
    "p": ([1, 10, 50, 100, 200], dict(batch=8, seq_len=64)),
    "batch": ([1, 4, 16], dict(p=20, seq_len=64)),
    "seq_len": ([32, 128, 256], dict(p=20, batch=8)),
}


def run_scaling(base: dict, precision: str, methods: list[str], out: Path, quick: bool) -> dict:
    """tokens/s and memory of prompt vs prefix against prompt length, batch size and sequence length."""
    grid = SCALING if not quick else {"p": ([1, 4], dict(batch=2, seq_len=16)), "batch": ([1, 2], dict(p=2, seq_len=16)),
                                      "seq_len": ([8, 16], dict(p=2, batch=2))}
    report = dict(command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]), kind="scaling",
                  date=datetime.datetime.now().isoformat(timespec="seconds"), machine=_machine(),
                  config={**base, "precision": precision}, points=[])
    for axis, (values, fixed) in grid.items():
        for value in values:
            for method in methods:
                spec = {**base, **fixed, axis: value, "tool": "scale", "method": method, "precision": precision,
                        "steps": 2 if quick else 3}
                res = run_job(spec, quick)
                report["points"].append(dict(axis=axis, value=value, method=method, **{k: spec[k] for k in SCALING},
                                             **res))
                print(f"[scaling] {axis}={value} {method}: " + (res.get("error") or
                      f"{res['tokens_per_s']:.0f} tok/s, {res['step_s']:.3f} s/step, +{res['step_memory_mb']:.0f} MB"),
                      flush=True)
        Path(f"{out}.json").write_text(json.dumps(report, indent=1) + "\n")
    Path(f"{out}.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_scaling(report, Path(f"{out}.png"))
    Path(f"{out}.md").write_text(scaling_markdown(report, Path(f"{out}.png").name))
    return report


def plot_scaling(report: dict, path: Path) -> None:
    """One PNG: tokens/s (top) and step memory (bottom) against each axis, a line per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    axes_names = list(dict.fromkeys(pt["axis"] for pt in report["points"]))
    fig = Figure(figsize=(4.2 * len(axes_names), 6.4))
    FigureCanvasAgg(fig)
    grid = fig.subplots(2, len(axes_names), squeeze=False)
    labels = {"p": "prompt length (virtual tokens)", "batch": "batch size (rows)", "seq_len": "sequence length (tokens)"}
    for col, axis in enumerate(axes_names):
        for method in dict.fromkeys(pt["method"] for pt in report["points"]):
            pts = [pt for pt in report["points"] if pt["axis"] == axis and pt["method"] == method and "error" not in pt]
            xs = [pt["value"] for pt in pts]
            grid[0][col].plot(xs, [pt["tokens_per_s"] for pt in pts], marker="o", label=method)
            grid[1][col].plot(xs, [pt["step_memory_mb"] for pt in pts], marker="o", label=method)
        first = next(pt for pt in report["points"] if pt["axis"] == axis)
        fixed = {k: first[k] for k in SCALING if k != axis}
        for row, ylabel in ((0, "tokens/s (real tokens)"), (1, "step memory, MB")):
            ax = grid[row][col]
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks([pt["value"] for pt in report["points"] if pt["axis"] == axis])
            ax.set_xticklabels([str(pt["value"]) for pt in report["points"] if pt["axis"] == axis])
            ax.set_xlabel(labels.get(axis, axis) + ("" if not fixed else "\n(" + ", ".join(f"{k}={v}" for k, v in fixed.items()) + ")"))
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    c = report["config"]
    fig.suptitle(f"{c['model']}, {c['precision']}, {report['machine']['cpus']} CPUs: training step cost")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def scaling_markdown(report: dict, png: str) -> str:
    c = report["config"]
    lines = [f"# Scaling {report['date']}: prompt vs prefix on {c['model']} ({c['precision']})", "",
             f"`{report['command']}`", "", f"![scaling]({png})", "",
             "| axis | value | method | batch | seq len | p | tokens/s | s/step | step memory MB | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for pt in report["points"]:
        if "error" in pt:
            lines.append(f"| {pt['axis']} | {pt['value']} | {pt['method']} | | | | error: {pt['error'][:100]} | | | |")
            continue
        lines.append(f"| {pt['axis']} | {pt['value']} | {pt['method']} | {pt['batch']} | {pt['seq_len']} | {pt['p']} | "
                     f"{pt['tokens_per_s']:.0f} | {pt['step_s']:.3f} | {pt['step_memory_mb']:.0f} | {pt['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


JOBS = {"ptune": job_ptune, "peft": job_peft, "floor": job_floor, "scale": job_scale}


def _job_main(spec_json: str) -> None:
    import logging

    logging.disable(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = json.loads(spec_json)
    result = JOBS[spec["tool"]](spec)
    result.setdefault("peak_rss_mb", _peak_rss_mb())
    print("BENCH-RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------------
def run_job(spec: dict, in_process: bool = False) -> dict:
    """One job's result dict, or {"error": "..."}; in a fresh subprocess unless in_process (--quick)."""
    if in_process:  # quick mode: no interpreter start-up per job; peak RSS is then the process's so far
        import logging

        logging.disable(logging.INFO)
        try:
            result = JOBS[spec["tool"]](spec)
        except Exception as e:  # noqa: BLE001 - a failed job is a row, not a lost bench
            return {"error": f"{type(e).__name__}: {e}"}
        finally:
            logging.disable(logging.NOTSET)  # the caller's logging as it was (tests read log lines)
        result.setdefault("peak_rss_mb", _peak_rss_mb())
        return result
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    shared = ROOT.parent / "shared" / "data"
    if "PTUNE_DATA_DIR" not in env and shared.is_dir():  # a checkout beside the shared data (this image, CI)
        env["PTUNE_DATA_DIR"] = str(shared)
    proc = subprocess.run([sys.executable, __file__, "_job", json.dumps(spec)], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH-RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": " | ".join(tail) or f"exit {proc.returncode}"}
    return json.loads(lines[-1][len("BENCH-RESULT "):])


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"]}
    med = statistics.median
    return dict(trainable_params=ok[0]["trainable_params"],
                tokens_per_s=med(r["tokens"] / r["train_time_s"] for r in ok),
                step_s=med(med(r["step_s"]) for r in ok), peak_rss_mb=med(r["peak_rss_mb"] for r in ok),
                loss=med(r["loss"] for r in ok), dev_loss=med(r["dev_loss"] for r in ok),
                dev_losses=[r["dev_loss"] for r in ok],
                eval=med([r["eval"] for r in ok if r["eval"] is not None] or [float("nan")]),
                extra_tokens_per_example=ok[0]["extra_tokens_per_example"], rounds=len(ok))


def roofline(row: dict, floor: dict, method: str, peak_gflops: float) -> float:
    n = floor["backbone_params"] - floor["embedding_params"]  # non-embedding parameters
    per_token = (6 if method == "fine-tune" else 4) * n
    stretch = 1 + row["extra_tokens_per_example"] / floor["mean_tokens_per_example"]
    return row["tokens_per_s"] * stretch * per_token / (peak_gflops * 1e9)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="smollm2-e2e", choices=sorted(CONFIGS))
    ap.add_argument("--quick", action="store_true", help="a tiny model (tiny-llama; tiny-bert with --config "
                    "tiny-sst2), few steps, jobs in this process: checks the bench runs (CI)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--precisions", default="fp32")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--lr", type=float, help="learning rate of both tools (default: the config's; fine-tune 5e-5)")
    ap.add_argument("--rounds", type=int, default=2, help="A B pairs per method and precision")
    ap.add_argument("--loss-window", type=int, default=10)
    ap.add_argument("--ptune-extra", default="", help="space-separated overrides for ptune's jobs only, e.g. "
                    "'trainer.frozen_dtype=fp32' (a lever off) or 'trainer.group_by_length=false'")
    ap.add_argument("--out", help="output prefix (default bench/<date>)")
    ap.add_argument("--scaling", action="store_true", help="ptune alone: tokens/s and memory of --methods (default "
                    "prompt,prefix) against prompt length, batch size and sequence length; writes <out>.md/.json/.png")
    ap.add_argument("--render", metavar="JSON", help="rewrite the .md (and rooflines) of an existing report; runs nothing")
    a = ap.parse_args(argv)
    if a.render:
        report = json.loads(Path(a.render).read_text())
        for row in report["rows"]:
            for tool in ("ptune", "peft"):
                floor = report["floor"][row["precision"]]
                if "error" not in row[tool] and "error" not in floor:
                    row[tool]["roofline"] = roofline(row[tool], floor, row["method"], report["matmul_gflops"][row["precision"]])
        _write(Path(a.render).with_suffix(""), report)
        return 0
    base = dict(CONFIGS[a.config if a.config.startswith("tiny") else "tiny"] if a.quick else CONFIGS[a.config])
    base["ptune_extra"] = a.ptune_extra.split()
    if a.steps:
        base["steps"] = a.steps
    if a.lr:
        base["lr"] = a.lr
    if a.quick:  # one round, jobs in this process (peak RSS is then cumulative, not per job)
        a.rounds = min(a.rounds, 1)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        shared = ROOT.parent / "shared" / "data"
        if "PTUNE_DATA_DIR" not in os.environ and shared.is_dir():
            os.environ["PTUNE_DATA_DIR"] = str(shared)
    base["loss_window"] = min(a.loss_window, base["steps"])
    methods = [m for m in a.methods.split(",") if m]
    precisions = [p for p in a.precisions.split(",") if p]
    out = Path(a.out) if a.out else ROOT / "bench" / datetime.date.today().isoformat()
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.scaling:
        if a.methods == ",".join(METHODS):
            methods = ["prompt", "prefix"]
        report = run_scaling(base, precisions[0], methods, out, a.quick)
        print(f"wrote {out}.md, {out}.json and {out}.png")
        return 0 if all("error" not in pt for pt in report["points"]) else 1

    t_start = time.time()
    peaks = {p: matmul_gflops(p) for p in precisions}
    report = dict(command=" ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
                  date=datetime.datetime.now().isoformat(timespec="seconds"), machine=_machine(),
                  config={k: v for k, v in base.items()}, matmul_gflops=peaks, floor={}, rows=[])
    for prec in precisions:
        floor = run_job({**base, "tool": "floor", "method": "fine-tune", "precision": prec}, a.quick)
        report["floor"][prec] = floor
        print(f"[{prec}] floor: {floor}", flush=True)
        if "error" in floor:  # the backbone or the data cannot be loaded: every job would fail the same way
            _write(out, report)
            print(f"error: {floor['error']}", file=sys.stderr)
            return 1
        for method in methods:
            runs = {"ptune": [], "peft": []}
            for r in range(a.rounds):
                for tool in ("ptune", "peft"):  # A B A B
                    # round r trains with seed 42 + r in both tools (data order, initial tensors, dropout): the
                    # medians then span seeds, and the dev losses say how much a seed alone moves them
                    res = run_job({**base, "tool": tool, "method": method, "precision": prec, "seed": 42 + r}, a.quick)
                    runs[tool].append(res)
                    print(f"[{prec}] {method} round {r + 1} {tool}: " + _short(res), flush=True)
            row = dict(method=method, precision=prec, ptune=summarize(runs["ptune"]), peft=summarize(runs["peft"]),
                       raw=runs)
            for tool in ("ptune", "peft"):
                if "error" not in row[tool] and "error" not in floor:
                    row[tool]["roofline"] = roofline(row[tool], floor, method, peaks[prec])
            report["rows"].append(row)
            _write(out, report)  # after every method: an interrupted bench keeps what it measured
    report["bench_wall_s"] = round(time.time() - t_start, 1)
    _write(out, report)
    print(f"wrote {out}.md and {out}.json ({report['bench_wall_s']:.0f} s)")
    return 0 if all("error" not in r["ptune"] and "error" not in r["peft"] for r in report["rows"]) else 1


def _short(res: dict) -> str:
    if "error" in res:
        return "ERROR " + res["error"]
    return (f"{res['tokens'] / res['train_time_s']:.0f} tok/s, step {statistics.median(res['step_s']):.3f} s, "
            f"loss {res['loss']:.4f}, bleu {res['eval']}, rss {res['peak_rss_mb']:.0f} MB")


def _machine() -> dict:
    import torch

    return dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__,
                threads=torch.get_num_threads(), cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def _write(out: Path, report: dict) -> None:
    Path(f"{out}.json").write_text(json.dumps(report, indent=1) + "\n")
    Path(f"{out}.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    c = report["config"]
    metric = c.get("metric", "bleu")
    if c["task"] == "e2e":
        evaluated = (f"eval BLEU on {c['eval_samples']} dev MRs (greedy, ptune's evaluator for both: PEFT's trained "
                     f"tensors are loaded into a ptune method)")
    else:
        evaluated = (f"eval {metric} on {c['eval_samples']} dev examples (each tool's own model: PEFT's sequence "
                     f"classifier reads BERT's pooler, ptune's linear head [CLS])")
    extra = " ".join(c.get("ptune_extra") or [])
    lines = [f"# Bench {report['date']}: ptune vs PEFT + Trainer", "",
             f"`{report['command']}`", "",
             f"{c['model']} on {c['task']}, batch {c['batch_size']}, {c['steps']} optimizer steps at lr {c['lr']:g} "
             f"(fine-tune {FINE_TUNE_LR:g}; linear decay, no warm-up, AdamW), {evaluated}; "
             f"train loss = mean of the last {c['loss_window']} logged steps (each tool's own batches); dev loss = "
             f"cross-entropy on the first {c.get('dev_loss_samples', '?')} dev examples in fp32, dropout off, the same "
             f"examples for both (per target token on E2E, per example on classification)"
             + (f"; ptune jobs ran with `{extra}`" if extra else "")
             + f". Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs, "
             f"torch {report['machine']['torch']} ({report['machine']['threads']} threads)"
             + (f", GPU {report['machine']['cuda']}" if report['machine']['cuda'] else "") + ".", "",
             "Matmul peak (2048², best of 10): " + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in report["matmul_gflops"].items())
             + ".", ""]
    for prec, floor in report["floor"].items():
        if "error" in floor:
            lines.append(f"Floor ({prec}): error {floor['error']}")
        else:
            lines.append(f"Floor ({prec}): forward-only {floor['forward_tokens_per_s']:.0f} tokens/s (full logits at "
                         f"every position), backbone {floor['backbone_params'] / 1e6:.1f} M parameters of which "
                         f"{floor['embedding_params'] / 1e6:.1f} M the input embedding, "
                         f"{floor['mean_tokens_per_example']:.1f} tokens per example.")
    lines += ["", f"| method | prec | tool | trainable | tokens/s | s/step (median) | peak RSS MB | train loss | dev loss | "
              f"{metric} | roofline |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        for tool in ("ptune", "peft"):
            r = row[tool]
            if "error" in r:
                lines.append(f"| {row['method']} | {row['precision']} | {tool} | error: {r['error'].split(' | ')[-1][:160]} "
                             f"| | | | | | | |")
                continue
            lines.append(f"| {row['method']} | {row['precision']} | {tool} | {r['trainable_params']:,} | "
                         f"{r['tokens_per_s']:.0f} | {r['step_s']:.3f} | {r['peak_rss_mb']:.0f} | {r['loss']:.4f} | "
                         f"{_num(r.get('dev_loss'))} | {_num(r['eval'])} | {r.get('roofline', float('nan')):.1%} |")
        p, q = row["ptune"], row["peft"]
        if "error" not in p and "error" not in q:
            lines.append(f"| {row['method']} | {row['precision']} | **ptune / PEFT** | | "
                         f"**{p['tokens_per_s'] / q['tokens_per_s']:.2f}x** | {p['step_s'] / q['step_s']:.2f}x | "
                         f"{p['peak_rss_mb'] / q['peak_rss_mb']:.2f}x | {p['loss'] - q['loss']:+.4f} | "
                         f"{_diff(p.get('dev_loss'), q.get('dev_loss'))} | {_diff(p['eval'], q['eval'])} | |")
    seeds = [(row, row["ptune"].get("dev_losses"), row["peft"].get("dev_losses")) for row in report["rows"]]
    if any(p and q and len(p) > 1 for _, p, q in seeds):
        lines += ["", "Dev loss per round (round r trains with seed 42 + r in both tools):", ""]
        for row, p, q in seeds:
            if p and q:
                lines.append(f"- {row['method']} {row['precision']}: ptune {', '.join(f'{x:.4f}' for x in p)}; "
                             f"PEFT {', '.join(f'{x:.4f}' for x in q)}")
    lines += ["", f"Bench wall time: {report.get('bench_wall_s', 'unfinished')} s.", ""]
    return "\n".join(lines)


def _num(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "n/a"


def _diff(a, b) -> str:
    return f"{a - b:+.4f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else "n/a"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_job":
        _job_main(sys.argv[2])
        sys.exit(0)
    sys.exit(main())
