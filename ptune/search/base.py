"""What every prompt search shares: its directory, its resumable state, scoring a candidate prompt
with nothing trained, and writing what it found in a form `ptune train` takes.

    <output_dir>/YYYY-MM-DD/HH-MM-SS/        a search directory
        config.yaml          the composed config (train's groups + `search`), resolved
        search_state.json    the state a resume continues from (written atomically after each stage)
        candidates.jsonl     every candidate scored so far, with its score (rewritten with the state)
        result.yaml          what it found: task keys (template / verbalizer / triggers), editable
        overrides.txt        the same as `ptune train` overrides, shell-quoted, one line
        summary.json         wall time, the best candidate's score, how many were scored
        search.log

A search changes no weight: the backbone is frozen and the method is hard-prompt, so a candidate
is scored by the task's own classifier (ptune.heads.verbalizer.VerbalizerHead) on few-shot rows.
Randomness in a search comes from generators seeded by (search.seed, stage, iteration), never from
a global stream, so a resumed search draws what the uninterrupted one would have drawn: the saved
state is just the stage's results and counters (bit-identical on CPU, tested).
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shlex
import time
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from ptune.build import build
from ptune.data import collate
from ptune.errors import PtuneError
from ptune.heads.verbalizer import VocabHead
from ptune.rundir import RunDir, jsonl, write_atomic, write_json
from ptune.tasks.classification import verbalizer_words
from ptune.tasks.templates import Template

log = logging.getLogger("ptune")


class SearchDir(RunDir):
    state = property(lambda self: self.path / "search_state.json")
    candidates = property(lambda self: self.path / "candidates.jsonl")
    result = property(lambda self: self.path / "result.yaml")
    overrides = property(lambda self: self.path / "overrides.txt")
    log = property(lambda self: self.path / "search.log")

    def load_state(self) -> dict:
        """The saved state ({} for a fresh search); a damaged file is one PtuneError line."""
        if not self.state.is_file():
            return {}
        try:
            state = json.loads(self.state.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PtuneError(f"{self.state} is damaged (not JSON); delete it to start the search afresh") from None
        if not isinstance(state, dict):
            raise PtuneError(f"{self.state} holds no search state; delete it to start the search afresh")
        return state

    def save(self, state: dict, candidates: list[dict]) -> None:
        """State and candidates together; the state file is replaced last, so a kill between the two
        leaves the older state, which the candidates written with it extend, never contradict."""
        write_atomic(self.candidates, jsonl(candidates))
        write_json(state, self.state)


# -- scoring prompts with nothing trained ----------------------------------------------------------
class Scorer:
    """A frozen backbone with the task of the search's config, and the few-shot rows it searches on.

    `variant(template=, verbalizer=, triggers=)` is the task with those keys replaced (checked and
    bound as `ptune train` would); `accuracy(task, rows)` its zero-shot accuracy."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.backbone, self.method, self.task = build(cfg)
        self.batch_size = cfg.trainer.eval_batch_size

    def rows(self, split: str) -> list[dict]:
        return self.task.rows(split)

    def variant(self, template: str | None = None, verbalizer: dict | None = None, triggers: list | None = None):
        t = copy.copy(self.task)
        if template is not None:
            t.template = Template(template)
            t.template.check_fields(t.fields, t.name)
            t.template.require_mask("a prompt search")
            t._template_given = True
        if verbalizer is not None:
            t.verbalizer = verbalizer_words(verbalizer, list(t.labels), "the searched verbalizer")
        if triggers is not None:
            t.triggers = list(triggers)
        t.bind(self.backbone, self.method)
        self.method.attach_head(t.slot_head(self.backbone))
        return t

    def accuracy(self, task, rows: list[dict]) -> float:
        """Zero-shot accuracy of `task` (a variant) on rows; the method's head is the variant's."""
        self.method.attach_head(task.slot_head(self.backbone))
        preds = task.classify(self.method, rows, self.batch_size)
        return sum(int(p == r["label"]) for p, r in zip(preds, rows)) / len(rows)

    def mask_log_probs(self, task, rows: list[dict]) -> torch.Tensor:
        """(len(rows), vocab) log P(token at {mask} | row in task's template), single-token answers."""
        head = VocabHead(self.backbone)
        tok = self.backbone.tokenizer
        examples = task.examples(tok, rows)
        out = []
        with torch.no_grad():
            for s in range(0, len(examples), self.batch_size):
                batch = collate(examples[s:s + self.batch_size], tok.pad_token_id)
                out.append(head.scores(self.method, batch).float().cpu())
        return torch.cat(out)


# -- what a search leaves ----------------------------------------------------------------------------
def hydra_quote(value) -> str:
    """A value in Hydra's override grammar: strings double-quoted, lists and dicts element by
    element, so `ptune train` reads back exactly `value` (tested). Hydra unescapes backslashes only
    where they precede a quote: a " becomes \\", and a run of backslashes before a quote or the
    closing quote is doubled."""
    if isinstance(value, str):
        text = re.sub(r'(\\*)"', lambda m: m.group(1) * 2 + '\\"', value)
        return '"' + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_quote(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_quote(v)}" for k, v in value.items()) + "}"
    if value is None:
        return "null"
    return str(value)


def overrides_line(task_keys: dict) -> str:
    """`ptune train` overrides that set the found task keys, shell-quoted (one line)."""
    return " ".join(shlex.quote(f"task.{k}={hydra_quote(v)}") for k, v in task_keys.items())


def finish(sdir: SearchDir, cfg: DictConfig, kind: str, found: dict, best: dict, n_candidates: int,
           wall_s: float) -> dict:
    """result.yaml, overrides.txt and summary.json of a finished search; returns the summary."""
    found = {"head": "verbalizer", **found}  # what a found template / verbalizer is read by
    line = overrides_line(found)
    header = (f"# ptune search {kind}: what it found, as task keys (edit freely). Train with it:\n"
              f"#   ptune train task={cfg.task.name} model={cfg.model.name} {line}\n")
    write_atomic(sdir.result, header + yaml.safe_dump({"task": found}, sort_keys=False, allow_unicode=True))
    write_atomic(sdir.overrides, line + "\n")
    summary = {"search": kind, "model": cfg.model.name, "task": cfg.task.name, "found": found, "best": best,
               "candidates_scored": n_candidates, "wall_time_s": round(wall_s, 2),
               "few_shot": cfg.task.get("few_shot"), "few_shot_seed": cfg.task.get("few_shot_seed")}
    write_json(summary, sdir.summary)
    return summary


def elapsed(state: dict, started: float) -> float:
    """Wall time of the search so far, over all its resumed pieces."""
    return state.get("wall_time_s", 0.0) + time.perf_counter() - started


def write_config(sdir: SearchDir, cfg: DictConfig) -> None:
    sdir.write_config(OmegaConf.to_yaml(cfg, resolve=True))


def search_dir(path) -> SearchDir:
    sdir = SearchDir(path)
    if not sdir.config.is_file() or not (Path(path) / "search_state.json").is_file() and not sdir.summary.is_file():
        raise PtuneError(f"{path} is not a ptune search directory (no config.yaml and search_state.json); pass a "
                         f"directory printed by `ptune search`")
    return sdir
