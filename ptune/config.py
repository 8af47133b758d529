"""Checks on a composed config, with one clear line per problem, and the per-group kwargs.

Composition (Hydra) already rejects unknown groups and keys; this module rejects values that
compose but cannot run (a zero prompt length, a negative learning rate, ...).
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ptune.errors import PtuneError

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("linear", "cosine", "constant")
FROZEN_DTYPES = ("auto", "fp32")
ATTENTIONS = ("auto", "sdpa", "eager")


def _need(ok: bool, key: str, value, rule: str) -> None:
    if not ok:
        raise PtuneError(f"{key}={value!r} is invalid: {rule}")


def _int_at_least(cfg: DictConfig, key: str, low: int, optional: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if optional and value is None:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    _need(ok, key, value, f"must be an integer >= {low}" + (" or null" if optional else ""))


def check(cfg: DictConfig) -> None:
    """Raise PtuneError naming the first key whose value cannot run."""
    if "num_virtual_tokens" in cfg.method:
        _int_at_least(cfg, "method.num_virtual_tokens", 1)
    for key in ("max_steps", "batch_size", "grad_accum", "eval_every", "save_every", "keep_last", "log_every",
                "eval_batch_size"):
        _int_at_least(cfg, f"trainer.{key}", 1)
    _int_at_least(cfg, "trainer.warmup_steps", 0)
    _int_at_least(cfg, "trainer.seed", 0)
    t = cfg.trainer
    _need(isinstance(t.lr, (int, float)) and t.lr > 0, "trainer.lr", t.lr, "must be a number > 0")
    _need(isinstance(t.weight_decay, (int, float)) and t.weight_decay >= 0, "trainer.weight_decay", t.weight_decay,
          "must be a number >= 0")
    _need(isinstance(t.max_grad_norm, (int, float)) and t.max_grad_norm >= 0, "trainer.max_grad_norm",
          t.max_grad_norm, "must be a number >= 0 (0 turns clipping off)")
    _need(t.precision in PRECISIONS, "trainer.precision", t.precision, f"choose one of {', '.join(PRECISIONS)}")
    _need(t.get("frozen_dtype", "fp32") in FROZEN_DTYPES, "trainer.frozen_dtype", t.get("frozen_dtype"),
          f"choose one of {', '.join(FROZEN_DTYPES)}")
    _need(t.get("attention", "sdpa") in ATTENTIONS, "trainer.attention", t.get("attention"),
          f"choose one of {', '.join(ATTENTIONS)}")
    _need(t.schedule in SCHEDULES, "trainer.schedule", t.schedule, f"choose one of {', '.join(SCHEDULES)}")
    _int_at_least(cfg, "task.max_train_samples", 1, optional=True)
    _int_at_least(cfg, "task.max_eval_samples", 1, optional=True)


def _kwargs(group: DictConfig) -> dict:
    out = OmegaConf.to_container(group, resolve=True)
    out.pop("name", None)
    return out


def method_kwargs(cfg: DictConfig) -> dict:
    return _kwargs(cfg.method)


def task_kwargs(cfg: DictConfig) -> dict:
    return _kwargs(cfg.task)
