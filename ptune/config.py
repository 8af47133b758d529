"""Configuration at the boundary: composing conf/ with Hydra, the YAML defaults every builder
reads, value checks on a composed config, and the one parser for the keys of the commands that
load a finished run (eval, predict, serve, export).

Composition (Hydra) already rejects unknown groups and keys; `check` rejects values that compose
but cannot run (a zero prompt length, a negative learning rate, ...). Every problem is one
PtuneError line.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from ptune.errors import PtuneError

# conf/ sits at the repository root (editable install); a wheel carries it as ptune/conf.
_ROOT_CONF = Path(__file__).resolve().parent.parent / "conf"
CONF_DIR = _ROOT_CONF if (_ROOT_CONF / "train.yaml").exists() else Path(__file__).resolve().parent / "conf"
GROUPS = ("method", "model", "task", "trainer")
TRACKERS = ("tensorboard", "mlflow", "trackio", "wandb")

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("linear", "cosine", "constant")
FROZEN_DTYPES = ("auto", "fp32")
ATTENTIONS = ("auto", "sdpa", "eager")
SHARDS = ("none", "fsdp")  # trainer.shard (ptune.train.shard)
QUANTIZE = ("none", "int8", "int4", "nf4")  # model.quantize (ptune.quantize)


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


def compose(overrides: list[str], hydra: bool = False):
    """The composed config for one job (with Hydra's own node under `hydra` when hydra=True).
    Raises PtuneError with one line on any problem."""
    _check_groups(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="train", overrides=overrides, return_hydra_config=hydra)
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
    try:
        return OverridesParser.create().parse_override(override).value()
    except Exception as e:  # noqa: BLE001 -- Hydra's grammar errors have several types
        raise PtuneError(f"cannot parse override {override!r}: {str(e).splitlines()[0]}") from None


# -- value checks on a composed config -------------------------------------------------------------
def _need(ok: bool, key: str, value, rule: str) -> None:
    if not ok:
        raise PtuneError(f"{key}={value!r} is invalid: {rule}")


# Upper bounds on integers that size what is allocated or looped over, so that a config (or a saved
# config.yaml from someone else) cannot ask for 25 GB before anything is checked. Far above any
# setting the papers use (prompt lengths <= 200, MLP widths 512, inputs of a few thousand tokens).
LIMITS = {"method.num_virtual_tokens": 10_000, "method.mid_dim": 65_536, "method.embed_dim": 65_536,
          "method.encoder_hidden_size": 65_536, "method.k": 10_000, "trainer.batch_size": 65_536,
          "trainer.eval_batch_size": 65_536, "trainer.grad_accum": 65_536, "trainer.keep_last": 10_000,
          "task.max_len": 1_000_000, "task.max_source_len": 1_000_000, "task.max_source_length": 1_000_000,
          "task.max_target_len": 1_000_000, "task.max_new_tokens": 100_000, "task.num_beams": 64}
LIMIT_ANY_INT = 10**12  # every other integer key (steps, seeds, sample counts)
TINY_LIMIT = 65_536  # every integer of a tiny model's config (layers, widths, positions)


def _int_at_least(cfg: DictConfig, key: str, low: int, optional: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if optional and value is None:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    _need(ok, key, value, f"must be an integer >= {low}" + (" or null" if optional else ""))
    high = LIMITS.get(key, LIMIT_ANY_INT)
    _need(value <= high, key, value, f"must be at most {high:,}")


def _number(cfg: DictConfig, key: str, low: float, rule: str, strict: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > low if strict else value >= low)
    _need(ok, key, value, rule)
    _need(math.isfinite(value), key, value, "must be a finite number (inf and nan cannot train)")


def _bounded_ints(cfg: DictConfig) -> None:
    """Every integer of the method, task and model groups within its limit (LIMITS, TINY_LIMIT)."""
    for group in ("method", "task"):
        for key, value in cfg[group].items():
            full = f"{group}.{key}"
            if isinstance(value, int) and not isinstance(value, bool) and not -LIMIT_ANY_INT <= value <= LIMITS.get(
                    full, LIMIT_ANY_INT):
                _need(False, full, value, f"must be at most {LIMITS.get(full, LIMIT_ANY_INT):,}")
    tiny = cfg.model.get("tiny")
    for key, value in (tiny.items() if isinstance(tiny, DictConfig) else []):
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= TINY_LIMIT:
            _need(False, f"model.tiny.{key}", value, f"must be an integer from 0 to {TINY_LIMIT:,}")


def check_keys(cfg: DictConfig) -> None:
    """Every key is one ptune reads: a group's keys are those of its YAML (any model file's for the
    model group), so `+task.head=linear` on a task without heads is refused, not ignored."""
    unknown = sorted(str(k) for k in cfg if k not in TOP_LEVEL)
    if unknown:
        raise PtuneError(f"unknown key {unknown[0]!r}; `ptune train --help` lists the keys of each group")
    for group in GROUPS:
        known = _known_keys(group, cfg[group].get("name"))
        extra = sorted(str(k) for k in cfg[group] if k not in known)
        if extra:
            raise PtuneError(f"unknown key '{group}.{extra[0]}'; `ptune train --help` lists the keys of each group")
    if "search" in cfg:  # ptune search's own group (conf/search/<name>.yaml)
        name = cfg.search.get("name") if isinstance(cfg.search, DictConfig) else None
        if name not in options("search"):
            raise PtuneError(f"search.name={name!r} is not a ptune search ({', '.join(options('search'))})")
        extra = sorted(str(k) for k in cfg.search if k not in _known_keys("search", name))
        if extra:
            raise PtuneError(f"unknown key 'search.{extra[0]}'; conf/search/{name}.yaml lists the search's keys")


def check(cfg: DictConfig) -> None:
    """Raise PtuneError naming the first key whose value cannot run."""
    check_keys(cfg)
    if "num_virtual_tokens" in cfg.method:
        _int_at_least(cfg, "method.num_virtual_tokens", 1)
    _bounded_ints(cfg)
    for key in ("max_steps", "batch_size", "grad_accum", "eval_every", "save_every", "keep_last", "log_every",
                "eval_batch_size"):
        _int_at_least(cfg, f"trainer.{key}", 1)
    _int_at_least(cfg, "trainer.warmup_steps", 0)
    _int_at_least(cfg, "trainer.seed", 0)
    t = cfg.trainer
    _number(cfg, "trainer.lr", 0, "must be a number > 0", strict=True)
    if t.get("head_lr") is not None:
        _number(cfg, "trainer.head_lr", 0, "must be a number > 0, or null (= trainer.lr)", strict=True)
    _number(cfg, "trainer.weight_decay", 0, "must be a number >= 0")
    _number(cfg, "trainer.max_grad_norm", 0, "must be a number >= 0 (0 turns clipping off)")
    _need(t.precision in PRECISIONS, "trainer.precision", t.precision, f"choose one of {', '.join(PRECISIONS)}")
    _need(t.get("frozen_dtype", "fp32") in FROZEN_DTYPES, "trainer.frozen_dtype", t.get("frozen_dtype"),
          f"choose one of {', '.join(FROZEN_DTYPES)}")
    _need(t.get("attention", "sdpa") in ATTENTIONS, "trainer.attention", t.get("attention"),
          f"choose one of {', '.join(ATTENTIONS)}")
    _need(isinstance(t.get("gradient_checkpointing", False), bool), "trainer.gradient_checkpointing",
          t.get("gradient_checkpointing"), "write true or false")
    _need(t.get("shard", "none") in SHARDS, "trainer.shard", t.get("shard"), f"choose one of {', '.join(SHARDS)}")
    _need(cfg.model.get("quantize", "none") in QUANTIZE, "model.quantize", cfg.model.get("quantize"),
          f"choose one of {', '.join(QUANTIZE)}")
    _need(t.schedule in SCHEDULES, "trainer.schedule", t.schedule, f"choose one of {', '.join(SCHEDULES)}")
    trackers = trackers_of(cfg)
    _need(all(x in TRACKERS for x in trackers), "trainer.log_with", t.get("log_with"),
          f"choose from {', '.join(TRACKERS)} (a name or a list), or null")
    _need(t.get("tracker_dir") is None or isinstance(t.get("tracker_dir"), str), "trainer.tracker_dir",
          t.get("tracker_dir"), "must be a folder path or null")
    _int_at_least(cfg, "task.max_train_samples", 1, optional=True)
    _int_at_least(cfg, "task.max_eval_samples", 1, optional=True)


def trackers_of(cfg: DictConfig) -> list[str]:
    """trainer.log_with as a list of tracker names ([] for null)."""
    value = cfg.trainer.get("log_with")
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value) if OmegaConf.is_list(value) else [value]


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


def _bool(key: str, text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise PtuneError(f"{key}={text!r} is invalid: write true or false")
    return text.lower() == "true"


def _adapter(key: str, text: str) -> str:
    if text not in ("adapter", "adapter_best"):
        raise PtuneError(f"{key}={text!r}: choose adapter (final) or adapter_best")
    return text


# Every key the run-loading commands take, with its check (None: any text). A command names the
# keys it takes and their defaults; a key shared by several commands is checked the same way in each.
def _text(key: str, text: str) -> str:
    if not text.strip():
        raise PtuneError(f"{key}={text!r} is invalid: give a value")
    return text


COMMAND_KEYS = {
    "run": None, "adapter": _adapter, "split": _text, "batch_size": _whole(1, LIMITS["trainer.eval_batch_size"]),
    "output": None, "input": None, "out": None, "format": None, "task": None, "label_map": None, "ensemble": None,
    "host": _text, "port": _whole(0, 65535), "max_batch": _whole(1, 100_000), "max_input_chars": _whole(1, 10**8),
    "max_batch_rows": _whole(1, 4096), "max_wait_ms": _whole(0, 60_000), "max_connections": _whole(1, 100_000),
    "max_tokens": _whole(1, 100_000), "workers": _whole(1, 256), "timeout": _whole(1, 3600), "trust_remote_code": _bool,
}
# What every run-loading command takes: the run, which adapter, batch size, and whether the model's
# own code may run (only ever from the command line: ptune.build.load_run).
LOADING = {"run": None, "adapter": "adapter", "batch_size": None, "trust_remote_code": "false"}
COMMON = {**LOADING, "split": "dev"}


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


# -- a saved config.yaml: untrusted input ----------------------------------------------------------
# Keys a saved config may lack: configs written before they existed, read with .get() and their old
# meaning (build.attention: sdpa; job.frozen_dtype: fp32) or filled from conf/ by the builders.
OPTIONAL_SAVED = {"trainer.head_lr", "trainer.attention", "trainer.frozen_dtype", "trainer.log_with", "trainer.tracker_dir",
                  "trainer.gradient_checkpointing", "trainer.shard", "model.quantize"}
TOP_LEVEL = {"method", "model", "task", "trainer", "output_dir", "resume", "search"}  # search: `ptune search` only


def _interpolations(node, path: str = ""):
    """Keys whose saved value is an OmegaConf interpolation (`${...}`): a saved config is written
    resolved, so one there was put in by hand and would be resolved from the loader's environment."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _interpolations(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _interpolations(v, f"{path}[{i}]")
    elif isinstance(node, str) and "${" in node:
        yield path


def _known_keys(group: str, name: str | None) -> set[str]:
    if group == "model":  # model files differ in their keys (tiny, tokenizer, name_or_path): any model key
        return set().union(*(set(_group_file("model", o)) for o in options("model")))
    return set(_group_file(group, name if group != "trainer" else "default"))


def load_saved(path: Path) -> DictConfig:
    """A run directory's config.yaml, checked as untrusted input before anything is built from it:
    valid YAML holding the four groups, names ptune has, no key ptune does not know, no missing key,
    no interpolation, every value as `check` wants it. One PtuneError line for the first problem;
    nothing is written."""
    path = Path(path)
    fix = "restore it (or start a new run); ptune writes it once, resolved, before the first step"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise PtuneError(f"{path} cannot be read ({getattr(e, 'strerror', None) or type(e).__name__}); {fix}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise PtuneError(f"{path} is not valid YAML{at}; {fix}") from None
    if not isinstance(data, dict) or not data:
        raise PtuneError(f"{path} holds no config (empty, or not a mapping of groups); {fix}")
    unknown = sorted(str(k) for k in data if k not in TOP_LEVEL)
    if unknown:
        raise PtuneError(f"{path}: unknown top-level key {unknown[0]!r}; {fix}")
    for group in GROUPS:
        if not isinstance(data.get(group), dict):
            raise PtuneError(f"{path} has no {group} group; {fix}")
        name = data[group].get("name")
        if group != "trainer" and (not isinstance(name, str) or name not in options(group)):
            raise PtuneError(f"{path}: {group}.name={name!r} is not a ptune {group} ({', '.join(options(group))}); {fix}")
    bad = next(_interpolations(data), None)
    if bad is not None:
        raise PtuneError(f"{path}: {bad} holds an interpolation (${{...}}), which ptune never writes and does not "
                         f"resolve from this machine's environment; write the value itself")
    try:
        check_keys(OmegaConf.create(data))
    except PtuneError as e:
        raise PtuneError(f"{path}: {str(e).split(';')[0]} (edited by hand, or written by another ptune); {fix}") from None
    for group in GROUPS:
        known = _known_keys(group, data[group].get("name"))
        if group in ("trainer", "model"):  # method and task keys a config lacks come from conf/ (older runs)
            required = known if group == "trainer" else {"name", "kind", "source"}
            missing = sorted(k for k in required if k not in data[group] and f"{group}.{k}" not in OPTIONAL_SAVED)
            if missing:
                raise PtuneError(f"{path} lacks {group}.{missing[0]}; {fix}")
    cfg = OmegaConf.create(data)
    check(cfg)
    return cfg
