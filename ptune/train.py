"""The config boundary: `train(cfg)`, `evaluate_run(...)`, `predict_run(...)` unpack the composed
config and call plain functions below them (models, methods, tasks, trainer).
"""

from __future__ import annotations

import json
import logging
import platform
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ptune import checkpoint as ckpt
from ptune import methods, models, rundir, tasks
from ptune.config import check, method_kwargs, task_kwargs
from ptune.errors import PtuneError
from ptune.trainer import TrainArgs, check_step_size, fit, peak_memory_mb, reset_peak_memory

log = logging.getLogger("ptune")

_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def setup_logging(run_dir: Path | None, main: bool = True) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_ptune", False):
            root.removeHandler(h)
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers = [logging.StreamHandler(sys.stderr)] if main else []
    if run_dir is not None and main:
        handlers.append(logging.FileHandler(Path(run_dir) / "train.log"))
    for h in handlers:
        h._ptune = True
        h.setFormatter(fmt)
        root.addHandler(h)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars on every load
    for noisy in ("transformers", "httpx", "urllib3", "datasets", "huggingface_hub", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_backbone(cfg: DictConfig):
    """The frozen backbone of a composed config (`model` group), attention as `trainer.attention` says."""
    backbone = models.load(cfg.model.name, cfg.model.kind, cfg.model.source, cfg.model.get("name_or_path"),
                           OmegaConf.to_container(cfg.model.get("tiny")) if cfg.model.get("tiny") else None,
                           cfg.model.get("tokenizer"), seed=cfg.model.get("init_seed", 0),
                           trust_remote_code=cfg.model.get("trust_remote_code", False))
    attn = attention(cfg)
    if backbone.model.config._attn_implementation != attn:  # before any method wraps it (encoder prefixes)
        backbone.model.set_attn_implementation(attn)
    return backbone


def attention(cfg: DictConfig) -> str:
    """transformers' attention implementation for this config: `trainer.attention`, or for `auto`
    eager under bf16 on CPU and sdpa otherwise.

    Measured on SmolLM2-135M, one prefix-tuning step of batch 8, one thread (scripts/probe_attention.py,
    docs/performance.md): under bf16 autocast PyTorch's CPU flash-attention kernel (sdpa) costs more
    than the plain matmul-softmax-matmul (eager) at ~60, 128 and 256 tokens per row (1.99 / 4.38 /
    8.61 s against 1.56 / 3.62 / 7.80); in fp32 the two are equal. The gap narrows as rows grow: for
    long inputs set trainer.attention=sdpa. A config saved before the key existed ran sdpa and resumes so.
    """
    choice = cfg.trainer.get("attention", "sdpa")
    if choice != "auto":
        return choice
    return "eager" if cfg.trainer.precision == "bf16" and not torch.cuda.is_available() else "sdpa"


def build(cfg: DictConfig, backbone=None):
    """(backbone, method, task) from a composed config. A given backbone (built from the same
    `model` config) is used instead of loading one: several runs then share it (ptune.multi)."""
    backbone = backbone if backbone is not None else build_backbone(cfg)
    task = tasks.build(cfg.task.name, **task_kwargs(cfg))
    kwargs = method_kwargs(cfg)
    if kwargs.get("init") == "labels":  # prompt tuning's class-label init embeds the task's label words
        kwargs["label_words"] = task.label_words() if hasattr(task, "label_words") else None
    torch.manual_seed(cfg.trainer.seed)  # the method's initial tensors come from the run's seed
    method = methods.build(cfg.method.name, backbone, **kwargs)
    _attach_head(method, task, backbone, cfg.trainer.seed)
    return backbone, method, task


def _attach_head(method, task, backbone, seed: int) -> None:
    """Give the method the head its task asks for (`task.head`; generation tasks have none: lm)."""
    from ptune.heads import LinearHead

    head = getattr(task, "head", "lm")
    if head == "lm" and backbone.kind in ("masked", "encoder"):
        raise PtuneError(f"task={task.name} generates text, which model={backbone.name} ({backbone.kind}, no "
                         f"left-to-right decoder) cannot; use a causal or seq2seq model")
    if hasattr(task, "bind"):  # templates checked against this backbone and method (ptune.templates)
        task.bind(backbone, method)
    if head in ("verbalizer", "vocab"):  # the LM's own word scores at the template's {mask} (ptune.verbalizer)
        method.attach_head(task.slot_head(backbone))
        return
    if head != "linear":
        return
    if method.name == "hard-prompt":
        # By definition it trains nothing; with a trained head it would be a linear probe, which
        # is fine-tune's `trainable=head` (and reported as such, with its trainable count).
        raise PtuneError("method=hard-prompt trains nothing, so task.head=linear would train only the classifier on "
                         "a frozen backbone (a linear probe); run that as method=fine-tune method.trainable=head")
    method.attach_head(LinearHead(backbone.dims.hidden, len(task.labels), task.head_dropout, seed=seed))


def _accelerator(precision: str):
    from accelerate import Accelerator

    if precision == "fp16" and not torch.cuda.is_available():
        raise PtuneError("trainer.precision=fp16 needs a GPU; on CPU use trainer.precision=bf16 or fp32")
    from accelerate.state import AcceleratorState

    # Accelerate keeps one process-wide state and refuses another mixed precision for a later
    # Accelerator; a sweep over trainer.precision (one process, several jobs) needs one per job. The
    # distributed part (PartialState: ranks, process group) is kept.
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != _PRECISION[precision]:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=_PRECISION[precision], cpu=not torch.cuda.is_available())


def _claim_run_dir(accelerator, cfg: DictConfig, run_dir: Path | None) -> Path:
    """Rank 0 creates the directory; the others receive its path."""
    from accelerate.utils import broadcast_object_list

    box = [str(run_dir) if run_dir else None]
    if accelerator.is_main_process and run_dir is None:
        box = [str(rundir.new_run_dir(cfg.output_dir))]
    if accelerator.num_processes > 1:
        broadcast_object_list(box)
    return Path(box[0])


def train(cfg: DictConfig, run_dir: Path | None = None, resume: bool = False) -> dict:
    """Run one training job into run_dir (claimed under cfg.output_dir if None). Returns summary."""
    check(cfg)
    reset_peak_memory()  # this job's peak, also when a sweep runs several in one process
    accelerator = _accelerator(cfg.trainer.precision)
    # Everything that can fail on bad input (model, method, data) is loaded before a run directory
    # is claimed or written, so a mistake leaves no half-made run behind.
    setup_logging(None, accelerator.is_main_process)  # console only until the run directory exists
    backbone, method, task = build(cfg)
    backbone.model.to(accelerator.device)
    method.to(accelerator.device)
    frozen = frozen_dtype(cfg)
    if frozen is not None:
        n = models.store_frozen(backbone.model, frozen)
        log.info("frozen matmul weights stored in %s (%d parameters); trained tensors stay fp32", frozen, n)
    examples = task.train_examples(backbone.tokenizer, backbone.kind)
    check_context(method, examples)
    check_step_size(len(examples), cfg.trainer.batch_size, cfg.trainer.grad_accum, accelerator.num_processes)
    if hasattr(task, "rows"):  # a bad evaluation file fails now, not at the first evaluation
        task.rows(cfg.trainer.eval_split)

    run_dir = _claim_run_dir(accelerator, cfg, run_dir)
    main = accelerator.is_main_process
    setup_logging(run_dir, main)
    resume_from = None
    if resume:
        resume_from = ckpt.latest_good(run_dir / "checkpoints")
        log.info("resuming %s from %s", run_dir, resume_from or "the start (no usable checkpoint)")
        if resume_from is None and main:  # killed before its first checkpoint: start the log afresh
            rundir.MetricsLog(run_dir / "metrics.jsonl").truncate_after(0)
    elif main:
        rundir.write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    log.info("run directory: %s", run_dir)
    t = cfg.trainer
    args = TrainArgs(max_steps=t.max_steps, batch_size=t.batch_size, grad_accum=t.grad_accum, lr=t.lr,
                     weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, schedule=t.schedule,
                     max_grad_norm=t.max_grad_norm, eval_every=t.eval_every, save_every=t.save_every,
                     keep_last=t.keep_last, log_every=t.log_every, seed=t.seed, eval_batch_size=t.eval_batch_size,
                     group_by_length=t.group_by_length, eval_split=t.eval_split)
    trainable = sum(p.numel() for p in method.trainable_tensors().values())
    log.info("%s on %s / %s: %d trainable of %d parameters, %d training examples", cfg.method.name, cfg.model.name,
             cfg.task.name, trainable, total_params(method), len(examples))

    def save_adapter(directory: Path) -> None:
        config = {**method.adapter_config(), "base_model": cfg.model.name, "task": cfg.task.name,
                  **_head_config(method, task)}
        ckpt.save_adapter(directory, adapter_tensors(method), config)

    state = fit(method, task, examples, args, accelerator, run_dir, resume_from, on_adapter=save_adapter)
    summary = None
    if main:
        save_adapter(run_dir / "adapter")
        summary = _summary(cfg, method, task, backbone, state, accelerator)
        rundir.write_summary(run_dir, summary)
        log.info("done: %s", run_dir)
    accelerator.wait_for_everyone()
    return {"run_dir": str(run_dir), "summary": summary}


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
    p = getattr(method, "p", 0)  # prompt, prefix, p-tuning, p-tuning-v2
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
        "eval": last_eval, "metric_for_best": task.metric_for_best,
        "best": state.best, "processes": accelerator.num_processes, "precision": cfg.trainer.precision,
        "device": str(accelerator.device), "torch": torch.__version__, "python": platform.python_version(),
    }


def load_run(run: str | Path) -> tuple[Path, DictConfig]:
    run_dir = Path(run)
    if not rundir.is_run_dir(run_dir):
        raise PtuneError(f"{run_dir} is not a ptune run directory (no config.yaml); "
                         f"pass a directory printed by `ptune train`")
    return run_dir, OmegaConf.load(run_dir / "config.yaml")


def _load_for_inference(run_dir: Path, cfg: DictConfig, which: str = "adapter", backbone=None):
    backbone, method, task = build(cfg, backbone)
    adapter = run_dir / which
    if not (adapter / "adapter_model.safetensors").exists():
        raise PtuneError(f"{adapter} has no adapter_model.safetensors; the run has not finished (resume it first)")
    _, tensors = ckpt.load_adapter(adapter)
    load_adapter_tensors(method, tensors)
    return backbone, method, task


# The task head is saved beside the method's tensors, as `head.*`, and split off again on load:
# methods stay unaware of heads, and a head works the same under every method.
def adapter_tensors(method) -> dict[str, torch.Tensor]:
    """What the adapter holds: the method's adapter tensors and, with a linear head, head.weight
    (n_classes, hidden) and head.bias (n_classes,)."""
    tensors = method.adapter_tensors()
    head = getattr(method, "head", None)
    if head is None:
        return tensors
    # A method's own `head.*` tensors can only be this submodule's (fine-tune lists them itself).
    return {**tensors, **{f"head.{k}": v.detach().float() for k, v in head.state_dict().items()}}


def load_adapter_tensors(method, tensors: dict[str, torch.Tensor]) -> None:
    """Load an adapter written by `adapter_tensors` into a method built from the same config."""
    head = getattr(method, "head", None)
    if head is None:
        method.load_adapter_tensors(tensors)
        return
    saved = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    expected = head.state_dict()
    if set(saved) != set(expected):
        raise PtuneError("the adapter holds no linear head (head.weight, head.bias) but task.head=linear needs one; "
                         "evaluate it with the task.head it was trained with")
    for k, v in saved.items():
        if v.shape != expected[k].shape:
            raise PtuneError(f"adapter tensor head.{k} has shape {tuple(v.shape)}, this task and model need "
                             f"{tuple(expected[k].shape)}; use the task and model the run was trained with")
    method.load_adapter_tensors({k: v for k, v in tensors.items() if not k.startswith("head.")})
    head.load_state_dict(saved)
    head.requires_grad_(False)  # loaded for inference, like a loaded prompt or prefix


def _head_config(method, task) -> dict:
    """adapter_config.json's description of the task head (nothing for generation tasks)."""
    head = getattr(method, "head", None)
    if head is None:
        return {}
    if hasattr(head, "config"):  # verbalizer / vocabulary heads: no tensors, their words
        return {"head": head.config()}
    n_classes, hidden = head.weight.shape
    return {"head": {"kind": "linear", "labels": task.label_words(), "hidden": hidden, "n_classes": n_classes,
                     "dropout": head.dropout, "tensors": "head.weight (n_classes, hidden), head.bias (n_classes,)"}}


def evaluate_run(run: str, split: str = "dev", which: str = "adapter", batch_size: int | None = None,
                 task_overrides: dict | None = None) -> dict:
    """Score a finished run on `split`. task_overrides ({"task.decoding": "beam", ...}) change how it
    is evaluated (decoding, how many examples), on top of the run's saved config."""
    run_dir, cfg = load_run(run)
    for key, value in (task_overrides or {}).items():
        if not key.startswith("task.") or OmegaConf.select(cfg, key, default="<missing>") == "<missing>":
            raise PtuneError(f"ptune eval: {key} is not a task key of this run; its task keys are: "
                             f"{', '.join('task.' + k for k in cfg.task if k != 'name')}")
        OmegaConf.update(cfg, key, value, merge=True)
    setup_logging(None)
    _, method, task = _load_for_inference(run_dir, cfg, which)
    scores, records = task.evaluate(method, split, batch_size or cfg.trainer.eval_batch_size)
    out = {"run": str(run_dir), "split": split, "adapter": which, "examples": len(records), "metrics": scores}
    if task_overrides:
        out["overrides"] = dict(task_overrides)
    ckpt.write_json(out, run_dir / f"eval_{split}.json")
    from ptune.trainer import _write_predictions

    _write_predictions(run_dir, split, records)
    return out


def predict_run(run: str, input_path: str, output: str | None = None, batch_size: int | None = None) -> Path:
    run_dir, cfg = load_run(run)
    setup_logging(None)
    _, method, task = _load_for_inference(run_dir, cfg)
    rows = read_rows(Path(input_path))
    preds = task.predict(method, rows, batch_size or cfg.trainer.eval_batch_size)
    out = Path(output) if output else run_dir / "predictions" / f"{Path(input_path).stem}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({**row, "prediction": p}) + "\n" for row, p in zip(rows, preds)))
    return out


def read_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl, .json, .csv or .tsv file as dicts."""
    import csv

    if not path.is_file():
        raise PtuneError(f"input file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        elif suffix == ".json":
            rows = json.loads(path.read_text())
        elif suffix in (".csv", ".tsv"):
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        else:
            raise PtuneError(f"input file {path}: unknown format {suffix!r}; use .jsonl, .json, .csv or .tsv")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PtuneError(f"input file {path} is not valid {suffix[1:]}: {e}") from None
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise PtuneError(f"input file {path} holds no rows of named fields")
    return rows
