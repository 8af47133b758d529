"""The training boundary: `train(cfg)` unpacks the composed config, builds the job (ptune.build),
claims the run directory and hands plain arguments to the loop (ptune.train.loop.fit).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import platform
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list
from omegaconf import DictConfig, OmegaConf

from ptune import methods, models, rundir
from ptune.adapter import WEIGHTS, adapter_tensors, head_config, load_adapter, load_adapter_tensors, save_adapter
from ptune.build import build, setup_logging
from ptune.config import OPTIONAL_SAVED, check
from ptune.errors import PtuneError
from ptune.rundir import RunDir
from ptune.train import checkpoint as ckpt
from ptune.train import shard, trackers
from ptune.train.loop import (TrainArgs, check_step_size, fit, fix_mmap_threshold, param_groups, peak_memory_mb,
                              reset_peak_memory, trim_heap)

log = logging.getLogger("ptune")

_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def _accelerator(precision: str):
    if precision == "fp16" and not torch.cuda.is_available():
        raise PtuneError("trainer.precision=fp16 needs a GPU; on CPU use trainer.precision=bf16 or fp32")

    # Accelerate keeps one process-wide state and refuses another mixed precision for a later
    # Accelerator; a sweep over trainer.precision (one process, several jobs) needs one per job. The
    # distributed part (PartialState: ranks, process group) is kept.
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != _PRECISION[precision]:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=_PRECISION[precision], cpu=not torch.cuda.is_available())


def _claim_run_dir(accelerator, cfg: DictConfig, run_dir: Path | None) -> Path:
    """Rank 0 creates the directory; the others receive its path."""
    box = [str(run_dir) if run_dir else None]
    if accelerator.is_main_process and run_dir is None:
        box = [str(rundir.new_run_dir(cfg.output_dir))]
    if accelerator.num_processes > 1:
        broadcast_object_list(box)
    return Path(box[0])


def train(cfg: DictConfig, run_dir: Path | None = None, resume: bool = False) -> dict:
    """Run one training job into run_dir (claimed under cfg.output_dir if None). Returns summary."""
    check(cfg)
    trackers.require(cfg)
    if not resume:
        rundir.refuse_inside_run(cfg.output_dir, "output_dir")  # a run is never nested in another run
    reset_peak_memory()  # this job's peak, also when a sweep runs several in one process
    accelerator = _accelerator(cfg.trainer.precision)
    sharded = cfg.trainer.get("shard", "none") == "fsdp"  # a config saved before the key existed: unsharded
    if sharded:
        shard.refuse(cfg.method.name, methods.trains_backbone(cfg.method.name), accelerator.num_processes,
                     cfg.model.get("quantize", "none") != "none")
    # Everything that can fail on bad input (model, method, data) is loaded before a run directory
    # is claimed or written, so a mistake leaves no half-made run behind.
    setup_logging(None, accelerator.is_main_process)  # console only until the run directory exists
    frozen = frozen_dtype(cfg)
    if sharded:
        backbone, method, task, n = _build_sharded(cfg, accelerator, frozen)
    else:
        backbone, method, task = _build(cfg)
        backbone.model.to(accelerator.device)
        _final_form(cfg, backbone, method, frozen)
        gc.collect()
        trim_heap()  # what the replaced weights (fp32 -> bf16, quantized) held goes back to the OS
    method.to(accelerator.device)
    if sharded:
        reset_peak_memory()  # the job's peak from the sharded state on (each process loaded the whole model in turn)
        log.info("trainer.shard=fsdp: %d layers sharded over %d processes; this process holds %.1f MB of the backbone",
                 n, accelerator.num_processes, shard.local_bytes(backbone.model) / 2**20)
    examples = task.train_examples(backbone.tokenizer, backbone.kind)
    check_context(method, examples)
    check_step_size(len(examples), cfg.trainer.batch_size, cfg.trainer.grad_accum, accelerator.num_processes)
    if hasattr(task, "rows"):  # a bad evaluation file fails now, not at the first evaluation
        task.rows(cfg.trainer.eval_split)

    run_dir = _claim_run_dir(accelerator, cfg, run_dir)
    run = RunDir(run_dir)
    main = accelerator.is_main_process
    setup_logging(run_dir, main)
    resume_from = None
    if resume:
        resume_from = ckpt.latest_good(run.checkpoints)
        log.info("resuming %s from %s", run_dir, resume_from or "the start (no usable checkpoint)")
        if resume_from is None and main:  # killed before its first checkpoint: start the log afresh
            run.metrics_log().truncate_after(0)
    elif main:
        run.write_config(OmegaConf.to_yaml(cfg, resolve=True))
    log.info("run directory: %s", run_dir)
    args = train_args(cfg)
    trainable = sum(p.numel() for p in method.trainable_tensors().values())
    log.info("%s on %s / %s: %d trainable of %d parameters, %d training examples", cfg.method.name, cfg.model.name,
             cfg.task.name, trainable, total_params(method), len(examples))

    def write_adapter(directory: Path) -> None:
        config = {**method.adapter_config(), "base_model": cfg.model.name, "task": cfg.task.name,
                  **head_config(method, task.label_words())}
        save_adapter(directory, adapter_tensors(method), config)

    tracked = trackers.start(cfg, run_dir, main)
    try:
        state = fit(method, task, examples, args, accelerator, run_dir, resume_from, on_adapter=write_adapter,
                    trackers=tracked)
    finally:
        tracked.finish()
    summary = None
    if main:
        write_adapter(run.adapter("adapter"))
        summary = _summary(cfg, method, task, backbone, state, accelerator)
    split = getattr(task, "report_split", None)
    if split is not None and (main or sharded):  # the few-shot protocol: the adapter chosen on dev, scored on test
        test = score_report_split(method, task, run, split, cfg.trainer.eval_batch_size, accelerator, write=main)
        if main:
            summary["test"] = test
            log.info("%s (%s, %d examples): %s", split, summary["test"]["adapter"], summary["test"]["examples"],
                     ", ".join(f"{k} {v:.4f}" for k, v in summary["test"]["metrics"].items()))
    if main:
        if summary["diverged"]:
            log.warning("training diverged: the loss went from %.4g at step 1 to %.4g at step %d without becoming "
                        "NaN; the adapter is unlikely to be useful: lower trainer.lr", state.first_loss,
                        state.last_loss, state.step)
        run.write_summary(summary)
        log.info("done: %s", run_dir)
    accelerator.wait_for_everyone()
    return {"run_dir": str(run_dir), "summary": summary}


def score_report_split(method, task, run: RunDir, split: str, batch_size: int, accelerator, write: bool = True) -> dict:
    """Score the adapter selected on dev (adapter_best; the final one when no evaluation improved)
    on `split` and write eval_<split>.json + predictions/<split>.jsonl (if `write`), as `ptune eval` would.
    The method is left holding that adapter. Runs after the final adapter is written (rank 0 wrote it
    at the last step), so the final one is safe."""
    which = "adapter_best" if (run.adapter("adapter_best") / WEIGHTS).is_file() else "adapter"
    _, tensors = load_adapter(run.adapter(which))
    load_adapter_tensors(method, tensors)
    method.backbone.model.eval()
    with accelerator.autocast():
        scores, records = task.evaluate(method, split, batch_size)
    out = {"run": str(run.path), "split": split, "adapter": which, "examples": len(records), "metrics": scores}
    if write:
        run.write_eval(split, out)
        run.write_predictions(split, records)
    return out


def train_args(cfg: DictConfig) -> TrainArgs:
    """The loop's arguments: every TrainArgs field from the `trainer` key of the same name."""
    return TrainArgs(**{f.name: cfg.trainer.get(f.name) if f"trainer.{f.name}" in OPTIONAL_SAVED else cfg.trainer[f.name]
                        for f in dataclasses.fields(TrainArgs)})  # OPTIONAL_SAVED: older configs lack it, None = its old meaning


DIVERGED = 3.0  # a final loss above 3x the first step's (and by more than 1 nat) is reported as divergence


def diverged(state) -> bool:
    """True when the loss exploded without becoming NaN (e.g. trainer.lr=100: 0.7 -> 2,535): the run
    ends normally, and summary.json, train.log and the command's last line say so."""
    first, last = state.first_loss, state.last_loss
    return first is not None and last is not None and last > DIVERGED * first and last - first > 1.0


def _build(cfg: DictConfig):
    backbone, method, task = build(cfg)
    # trainer.head_lr with no head tensors: refused before the training set is encoded
    param_groups(list(method.trainable_tensors()), train_args(cfg))
    return backbone, method, task


def _final_form(cfg: DictConfig, backbone, method, frozen: torch.dtype | None) -> None:
    """Activation checkpointing and the frozen weights' storage dtype, before any sharding."""
    if cfg.trainer.get("gradient_checkpointing", False):
        method.checkpoint_activations()
        log.info("activation checkpointing: the backbone's layers recompute their activations in backward")
    if frozen is not None:
        n = models.store_frozen(backbone.model, frozen)
        log.info("frozen matmul weights stored in %s (%d parameters); trained tensors stay fp32", frozen, n)


def _build_sharded(cfg: DictConfig, accelerator, frozen: torch.dtype | None):
    """trainer.shard=fsdp: the processes load in turn, each sharding its copy before the next one loads.

    Loading reads the whole checkpoint into host memory (transformers' from_pretrained, fp32), so N
    processes loading at once would hold N whole models on one machine; in turn, the host holds one whole
    model and the shards of the others. Each process builds exactly what an unsharded process builds (the
    method's initialisation may run the whole backbone: prefix's word activations, KPT's calibration) and only
    then keeps its share. Nothing reaches the device whole: FSDP moves each layer's share onto it as it shards,
    and only the parts that stay whole (embeddings, final norm, a head) are moved as they are. The cost is
    time: N loads one after another."""
    if accelerator.device.type == "cpu" and fix_mmap_threshold():
        log.info("trainer.shard=fsdp on CPU: glibc's mmap threshold fixed at 128 KiB, so the layers FSDP gathers "
                 "and frees go back to the OS (set MALLOC_MMAP_THRESHOLD_ to choose another)")
    mesh = shard.device_mesh(accelerator.num_processes, accelerator.device)  # every process, before the turns
    built = None
    for turn in range(accelerator.num_processes):
        if turn == accelerator.process_index:
            backbone, method, task = _build(cfg)
            _final_form(cfg, backbone, method, frozen)
            n = shard.shard_backbone(backbone.model, mesh, accelerator.device)
            built = backbone, method, task, n
            gc.collect()
            trim_heap()  # what the whole model held goes back to the OS before the next process loads
        accelerator.wait_for_everyone()
    return built


def frozen_dtype(cfg: DictConfig) -> torch.dtype | None:
    """The dtype frozen backbone tensors are stored in during training, None for unchanged (fp32).

    `trainer.frozen_dtype=auto` follows the precision: bf16 (or fp16) autocast computes every matmul in
    that dtype anyway, so the frozen matmul weights are kept in it (models.store_frozen: the same
    numbers, without a cast at every use). A config saved before the key existed resumes as it trained.
    """
    if cfg.trainer.precision == "fp32" or cfg.trainer.get("frozen_dtype", "fp32") == "fp32":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.trainer.precision]


def check_context(method, examples) -> None:
    """The virtual tokens plus the longest training input must fit the model's position table
    (GPT-2 n_positions, BERT/BART/Llama max_position_embeddings; T5's relative positions: no limit)."""
    config = method.backbone.model.config
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    p = method.num_virtual_tokens  # the virtual positions the method adds (prompt, prefix, p-tuning, p-tuning-v2)
    longest = max((len(e.input_ids) for e in examples), default=0)
    if limit and p + longest > limit:
        what = f"method.num_virtual_tokens={p} plus the longest training input ({longest} tokens) is {p + longest} " \
               f"positions" if p else f"the longest training input is {longest} tokens"
        raise PtuneError(f"{what}, more than model {method.backbone.name}'s {limit}; lower "
                         f"{'method.num_virtual_tokens or ' if p else ''}the task's maximum input length")


def total_params(method) -> int:
    """Backbone parameters plus the method's own (fine-tune trains backbone tensors: counted once)."""
    return sum(p.numel() for p in method.backbone.model.parameters()) + sum(p.numel() for p in method.parameters())


def _summary(cfg, method, task, backbone, state, accelerator) -> dict:
    trainable = sum(p.numel() for p in method.trainable_tensors().values())
    stored = sum(t.numel() for t in adapter_tensors(method).values())
    last_eval = state.history[-1]["metrics"] if state.history else {}
    return {
        "method": cfg.method.name, "model": cfg.model.name, "task": cfg.task.name,
        "steps": state.step, "trainable_params": trainable, "stored_params": stored,
        "total_params": total_params(method),
        "wall_time_s": round(state.wall_time_s, 2), "train_time_s": round(state.train_time_s, 2),
        "train_tokens": state.train_tokens,
        "train_tokens_per_s": round(state.train_tokens / max(state.train_time_s, 1e-9), 1),
        "peak_memory_mb": round(peak_memory_mb(), 1), "final_train_loss": state.last_loss,
        "first_train_loss": state.first_loss, "diverged": diverged(state),
        "eval": last_eval, "metric_for_best": task.metric_for_best,
        "best": state.best, "processes": accelerator.num_processes, "precision": cfg.trainer.precision,
        "shard": cfg.trainer.get("shard", "none"), "quantize": cfg.model.get("quantize", "none"),
        "backbone_mb": round(shard.local_bytes(backbone.model) / 2**20, 1),  # this process's share of the backbone
        "device": str(accelerator.device), "torch": torch.__version__, "python": platform.python_version(),
    }


def headline(result: dict) -> str:
    """Run directory and headline metric; empty on processes other than rank 0 (no summary)."""
    if result.get("summary") is None:
        return ""
    s = result["summary"]
    key = s.get("metric_for_best")
    value = (s.get("eval") or {}).get(key)
    shown = f"{value:.4f}" if isinstance(value, float) else value
    line = f"run: {result['run_dir']}\n{s.get('task')} dev {key}: {shown}  (final train loss {s.get('final_train_loss')})"
    test = s.get("test")
    if test:  # the few-shot protocol's reported number: the dev-selected adapter on the dataset's dev split
        value = test["metrics"].get(key)
        line += f"\n{s.get('task')} test {key}: {value:.4f}  ({test['adapter']}, {test['examples']} examples)"
    if s.get("diverged"):
        line += (f"\nwarning: training diverged (loss {s['first_train_loss']:.4g} at step 1, {s['final_train_loss']:.4g} at "
                 f"the end); lower trainer.lr")
    return line
