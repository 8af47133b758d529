"""Where the two wings meet: a backbone + method + head + task from a composed config, and a
finished run loaded from its directory.

    build(cfg)                       -> (backbone, method, task)      training and inference
    load_run(run)                    -> (RunDir, cfg)                 a run directory's saved config
    load_trained(run_dir, cfg, ...)  -> (backbone, method, task)      with the run's adapter loaded

Training (ptune.train) builds a fresh method and trains it; inference (ptune.infer) builds the
same objects and loads the adapter into them. Neither wing reaches into the other: what both
need lives here, in ptune.adapter (the adapter files) and in ptune.rundir (the directory).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ptune import heads, methods, models, quantize, tasks
from ptune.adapter import load_adapter, load_adapter_tensors
from ptune.config import load_saved, method_kwargs, task_kwargs
from ptune.errors import PtuneError
from ptune.heads import calibration
from ptune.rundir import RunDir

log = logging.getLogger("ptune")


def setup_logging(run_dir: Path | None, main: bool = True) -> None:
    """Console logging (main process), plus train.log in run_dir when given."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_ptune", False):
            root.removeHandler(h)
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers = [logging.StreamHandler(sys.stderr)] if main else []
    if run_dir is not None and main:
        handlers.append(logging.FileHandler(RunDir(run_dir).log))
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
    how = cfg.model.get("quantize", "none")  # a config saved before the key existed: unquantized
    if how != "none":
        cuda = torch.cuda.is_available()
        name = (cfg.get("method") or {}).get("name")
        quantize.refuse(how, name, methods.trains_backbone(name), cfg.trainer.precision, cuda)
        n = quantize.quantize(backbone.model, how, torch.device("cuda") if cuda else None)
        log.info("model.quantize=%s: %d frozen layer weights quantized (torchao)", how, n)
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


def build(cfg: DictConfig, backbone=None, saved_head: dict | None = None):
    """(backbone, method, task) from a composed config. A given backbone (built from the same
    `model` config) is used instead of loading one: several runs then share it (ptune.infer.pool).
    saved_head: a finished run's adapter_config.json `head`, for heads built from what training
    computed (the knowledgeable verbalizer's refined words) rather than computed again."""
    backbone = backbone if backbone is not None else build_backbone(cfg)
    task = tasks.build(cfg.task.name, **task_kwargs(cfg))
    kwargs = method_kwargs(cfg)
    if kwargs.get("init") == "labels":  # prompt tuning's class-label init: the label words as the verbalizer scores them
        kwargs["label_words"] = task.init_label_words(backbone.kind)
    torch.manual_seed(cfg.trainer.seed)  # the method's initial tensors come from the run's seed
    method = methods.build(cfg.method.name, backbone, **kwargs)
    attach_head(method, task, backbone, cfg.trainer.seed, saved_head)
    return backbone, method, task


def attach_head(method, task, backbone, seed: int, saved: dict | None = None) -> None:
    """Give the method the head its task asks for (`task.head`, declared in ptune/heads/;
    generation tasks have none: lm). saved: the head as a finished run's adapter config records it."""
    kind = heads.get(task.head)
    if kind.generates and backbone.kind in ("masked", "encoder"):
        raise PtuneError(f"task={task.name} generates text, which model={backbone.name} ({backbone.kind}, no "
                         f"left-to-right decoder) cannot; use a causal or seq2seq model")
    task.bind(backbone, method)  # templates checked against this backbone and method (ptune.tasks.templates)
    if kind.build is None:  # the LM's own output answers
        return
    head = kind.build(task, backbone, method, seed, saved)
    if any(True for _ in head.parameters()) and not method.trains:
        raise PtuneError(f"method={method.name} trains nothing, so with task.head={task.head} only the head would "
                         f"train, on a frozen backbone; run that as method=fine-tune method.trainable=head (zero-shot "
                         f"label words: task.head=verbalizer)")
    if kind.at_mask:  # task.calibrate, recorded in the adapter config (ptune/heads/calibration.py)
        head.calibration = calibration.describe() if getattr(task, "calibrate", False) else None
    method.attach_head(head)


def load_run(run: str | Path, trust_remote_code: bool = False) -> tuple[RunDir, DictConfig]:
    """A run directory and its saved config.yaml, read as untrusted input (config.load_saved).

    `model.trust_remote_code`, the one key that makes loading run code (a model folder's own Python
    files), comes from the caller's command line, never from the directory: a saved `true` without
    the caller's trust_remote_code=true is refused in one line; the caller's choice is what loads."""
    run_dir = RunDir(run)
    if not run_dir.exists():
        raise PtuneError(f"{run_dir} is not a ptune run directory (no config.yaml); "
                         f"pass a directory printed by `ptune train`")
    cfg = load_saved(run_dir.config)
    if "search" in cfg:  # a `ptune search` directory: what it found is task keys, not an adapter
        raise PtuneError(f"{run_dir} is a prompt search (ptune search {cfg.search.name}), not a training run; train "
                         f"with what it found: ptune train {' '.join(f'{g}={cfg[g].name}' for g in ('model', 'task'))} "
                         f"$(cat {run_dir}/overrides.txt)")
    if cfg.model.get("trust_remote_code") is True and trust_remote_code is not True:
        raise PtuneError(f"{run_dir}'s config sets model.trust_remote_code=true, which runs Python code shipped "
                         f"with the model ({cfg.model.get('name_or_path') or cfg.model.name}); a run directory cannot "
                         f"grant that: add trust_remote_code=true to the command if you trust that code")
    cfg.model.trust_remote_code = trust_remote_code is True
    return run_dir, cfg


def load_trained(run_dir: RunDir, cfg: DictConfig, which: str = "adapter", backbone=None):
    """(backbone, method, task) of a finished run with its adapter `which` (adapter | adapter_best) loaded."""
    adapter = RunDir(run_dir).adapter(which)
    if not (adapter / "adapter_model.safetensors").exists():
        raise PtuneError(f"{adapter} has no adapter_model.safetensors; the run has not finished (resume it first)")
    config, tensors = load_adapter(adapter)
    head = config.get("head") if isinstance(config, dict) else None
    kind = heads.find(cfg.task.get("head"))
    if kind is not None and kind.saved_config and not isinstance(head, dict):
        raise PtuneError(f"{adapter}/adapter_config.json holds no task.head={kind.name} head (what training computed "
                         f"for it, such as KPT's refined word list); retrain the run")
    backbone, method, task = build(cfg, backbone, saved_head=head)
    load_adapter_tensors(method, tensors)
    return backbone, method, task
