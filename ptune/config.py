"""Configuration at the boundary: composing conf/ with Hydra, the YAML defaults every builder
reads, value checks on a composed config, and the one parser for the keys of the commands that
load a finished run (eval, predict, serve, export).

Composition (Hydra) already rejects unknown groups and keys; `check` rejects values that compose
but cannot run (a zero prompt length, a negative learning rate, ...). Every problem is one
PtuneError line.
"""

from __future__ import annotations

import functools
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ptune.errors import PtuneError

# conf/ sits at the repository root (editable install); a wheel carries it as ptune/conf.
_ROOT_CONF = Path(__file__).resolve().parent.parent / "conf"
CONF_DIR = _ROOT_CONF if (_ROOT_CONF / "train.yaml").exists() else Path(__file__).resolve().parent / "conf"
GROUPS = ("method", "model", "task", "trainer")

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("linear", "cosine", "constant")
FROZEN_DTYPES = ("auto", "fp32")
ATTENTIONS = ("auto", "sdpa", "eager")


# -- conf/ -----------------------------------------------------------------------------------------
def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@functools.lru_cache(maxsize=None)
def _group_file(group: str, option: str) -> DictConfig:
    return OmegaConf.load(CONF_DIR / group / f"{option}.yaml")


def group_defaults(group: str, option: str) -> dict:
    """The keys of conf/<group>/<option>.yaml (without `name`), resolved now: the defaults a
    builder (methods.build, tasks.build) fills in for every key its caller did not give."""
    out = OmegaConf.to_container(_group_file(group, option), resolve=True)
    out.pop("name", None)
    return out


def _check_groups(overrides: list[str]) -> None:
    for o in overrides:
        key, eq, value = o.lstrip("+~").partition("=")
        if key in GROUPS and eq:
            for v in value.split(","):
                if v not in options(key):
                    raise PtuneError(f"unknown {key} {v!r}; choose one of: {', '.join(options(key))}")


def compose(overrides: list[str]):
    """The composed config for one job. Raises PtuneError with one line on any problem."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    _check_groups(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="train", overrides=overrides)
    except Exception as e:  # Hydra's messages are several lines; keep the one that names the problem
        raise PtuneError(_hydra_message(e, overrides)) from None


def _hydra_message(e: Exception, overrides: list[str]) -> str:
    text = f"{e} {e.__cause__ or ''}"
    if "Ambiguous value" in text or "Sweep parameters" in text:
        return "a comma-separated value is a sweep: add -m (ptune train -m ...), or quote it / use [a,b] for a list"
    if "not in struct" in text or "Could not override" in text or "Could not append" in text:
        key = next((o.partition("=")[0] for o in overrides if f"'{o.partition('=')[0]}'" in text), None)
        return f"unknown key {key!r}; `ptune train --help` lists the keys of each group" if key else text.splitlines()[0]
    if "parse" in text.lower() or "mismatched input" in text or "no viable" in text:
        return f"cannot parse overrides {' '.join(overrides)!r}: write them as key=value"
    return text.strip().splitlines()[0]


def override_value(override: str):
    """The value of one `key=value` override as Hydra's grammar reads it for `ptune train`
    (1e-3 a float, null None, [a,b] a list, 'quoted' a string)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(override).value()
    except Exception as e:  # noqa: BLE001 -- Hydra's grammar errors have several types
        raise PtuneError(f"cannot parse override {override!r}: {str(e).splitlines()[0]}") from None


# -- value checks on a composed config -------------------------------------------------------------
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


# -- the keys of eval, predict, serve and export ---------------------------------------------------
def _whole(low: int, high: int | None = None):
    """A check: the text of a whole number from low (to high), or one PtuneError line."""
    def check_value(key: str, text: str) -> int:
        value = int(text) if text.isdigit() else -1
        if value < low or (high is not None and value > high):
            raise PtuneError(f"{key}={text!r} is invalid: must be a whole number from {low}"
                             f"{f' to {high}' if high is not None else ' up'}")
        return value
    return check_value


def _adapter(key: str, text: str) -> str:
    if text not in ("adapter", "adapter_best"):
        raise PtuneError(f"{key}={text!r}: choose adapter (final) or adapter_best")
    return text


# Every key the run-loading commands take, with its check (None: any text). A command names the
# keys it takes and their defaults; a key shared by several commands is checked the same way in each.
COMMAND_KEYS = {
    "run": None, "adapter": _adapter, "split": None, "batch_size": _whole(1), "output": None, "input": None,
    "out": None, "format": None, "task": None, "label_map": None, "ensemble": None,
    "host": None, "port": _whole(0, 65535), "max_batch": _whole(1), "max_input_chars": _whole(1),
}
COMMON = {"run": None, "adapter": "adapter", "split": "dev", "batch_size": None}


def command_args(command: str, argv: list[str], keys: dict[str, str | None], required: tuple[str, ...] = ("run",),
                 usage: str | None = None) -> dict:
    """`key=value` arguments of `ptune <command>` -> {key: value}, every key of `keys` present
    (its default when not given), each given value checked (COMMAND_KEYS). One PtuneError line for
    an unknown or malformed argument, a missing required key, or a bad value."""
    out = dict(keys)
    for a in argv:
        key, eq, value = a.partition("=")
        if not eq or key not in keys:
            raise PtuneError(f"ptune {command}: unexpected argument {a!r}; expected {' '.join(k + '=...' for k in keys)}")
        out[key] = value
    missing = [k for k in required if not out.get(k)]
    if missing:
        raise PtuneError(usage or f"ptune {command} needs {' and '.join(k + '=...' for k in missing)}")
    for key, value in out.items():
        check_value = COMMAND_KEYS.get(key)
        if check_value is not None and isinstance(value, str):
            out[key] = check_value(key, value)
    return out
