"""Domain transfer: `ptune eval run=<dir> task=<other task> [label_map=...]`.

Lester et al. 2021 (Sec. 6, Table 2) train a prompt on one task and evaluate it zero-shot on
another with the same label space (QQP -> MRPC, SQuAD -> MRQA's out-of-domain sets). Here the
backbone, method and adapter (with its head) come from the run; the *task* is composed fresh from
conf/task/<other>.yaml with `task.*` overrides, so its data, template and label names are its own.

A label map says which of the trained head's classes stand for which of the new task's labels,
{trained label: new label}, e.g. `label_map=positive:positive,negative:negative` or a JSON/YAML
file holding that mapping. Default: identity by name when both tasks have the same label set.
A trained class left out of the map is ignored (the prediction is the best mapped class); several
trained classes may map to one new label (CB's contradiction and neutral -> RTE's not_entailment).
The score of a new label is then the logsumexp of its trained classes' scores, log sum_c exp(s_c),
as the verbalizer combines a label's words; for a one-to-one map this is a selection of rows.

- linear head: the trained `Linear(hidden, n_trained)` runs as before; `MappedHead` turns its
  (batch, n_trained) logits into (batch, n_new) scores.
- verbalizer head: the new task's template is read with the *trained* task's label words: a new
  label's words are the words of its trained classes (a fresh VerbalizerHead, tokenized with the
  new template's whitespace before {mask}). A new task whose template has no {mask} is refused by
  the task itself (give `task.template='... {mask} ...'`).

The result goes to `eval_<task>_<split>.json` in the run (custom tasks: `eval_custom-<file stem>_
<split>.json`) and predictions to `predictions/<same name>.jsonl`, never over the run's own eval.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ptune import heads, tasks
from ptune.build import load_run, load_trained, setup_logging
from ptune.config import task_kwargs
from ptune.errors import PtuneError
from ptune.heads.verbalizer import VerbalizerHead, word_pieces
from ptune.tasks.classification import ClassificationTask


def parse_label_map(spec: str | None) -> dict[str, str] | None:
    """{trained label: new label} from `a:b,c:d` or a .json/.yaml/.yml file holding a mapping."""
    if spec is None or spec == "":
        return None
    path = Path(spec).expanduser()
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        if not path.is_file():
            raise PtuneError(f"label_map={spec}: no such file")

        try:
            raw = json.loads(path.read_text()) if path.suffix.lower() == ".json" else yaml.safe_load(path.read_text())
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise PtuneError(f"label_map={spec}: not valid {path.suffix[1:]} ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict) or not raw:
            raise PtuneError(f"label_map={spec} must hold a mapping {{trained label: new label}}")
        return {str(k): str(v) for k, v in raw.items()}
    out = {}
    for pair in spec.split(","):
        src, colon, tgt = pair.partition(":")
        if not colon or not src.strip() or not tgt.strip():
            raise PtuneError(f"label_map={spec!r}: write trained:new pairs, e.g. label_map=positive:good,negative:bad "
                             f"(or a .json/.yaml file)")
        if src.strip() in out:
            raise PtuneError(f"label_map={spec!r} maps the trained label {src.strip()!r} twice")
        out[src.strip()] = tgt.strip()
    return out


def label_groups(mapping: dict[str, str] | None, trained: list[str], new: list[str]) -> list[list[int]]:
    """Per new label (in its class order) the indices of the trained classes that stand for it."""
    if mapping is None:
        if sorted(trained) != sorted(new):
            raise PtuneError(f"the run's labels ({', '.join(trained)}) differ from the task's ({', '.join(new)}); "
                             f"say which is which with label_map=<run label>:<task label>,... (or a .json/.yaml file)")
        mapping = {label: label for label in trained}
    for src, tgt in mapping.items():
        if src not in trained:
            raise PtuneError(f"label_map names {src!r}, which is not a label of the run ({', '.join(trained)})")
        if tgt not in new:
            raise PtuneError(f"label_map maps to {tgt!r}, which is not a label of the task ({', '.join(new)})")
    return [[trained.index(s) for s, t in mapping.items() if t == label] for label in new]


class MappedHead(nn.Module):
    """A trained linear head read through a label map: (batch, hidden) -> (batch, n_new) scores,
    each the logsumexp of its trained classes' logits (-inf for a new label without any)."""

    def __init__(self, head: nn.Module, groups: list[list[int]]):
        super().__init__()
        self.inner, self.groups = head, groups

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        logits = self.inner(pooled)  # (batch, n_trained)
        cols = [torch.logsumexp(logits[:, g], -1) if g else logits.new_full(logits.shape[:1], float("-inf"))
                for g in self.groups]
        return torch.stack(cols, -1)  # (batch, n_new)


def _mapped_verbalizer(backbone, trained_task, new_task, groups: list[list[int]]):
    words = []
    for label, group in zip(new_task.labels, groups):
        pieces = [word_pieces(backbone.tokenizer, w, new_task.template.mask_space, f"label {trained_task.labels[c]}")
                  for c in group for w in trained_task.verbalizer[c]]
        words.append(list(dict.fromkeys(pieces)))
    return VerbalizerHead(backbone, words, list(new_task.labels))


def evaluate_transfer(run: str, task_cfg: DictConfig, label_map: str | None = None, split: str = "dev",
                      which: str = "adapter", batch_size: int | None = None, head_given: bool = False,
                      trust_remote_code: bool = False) -> dict:
    """Score a run's adapter on another classification task (task_cfg: a composed `task` group).

    head_given: the user set task.head; it must then be the run's head (else the run's is used)."""
    run_dir, cfg = load_run(run, trust_remote_code)
    trained_head = cfg.task.get("head")
    kind = heads.find(trained_head)
    if kind is None or not kind.classifies:
        raise PtuneError(f"the run's task {cfg.task.name} has no classification head (task.head={trained_head}); "
                         f"domain transfer maps a classifier's labels")
    if kind.transfer is None:  # KPT's refined lists, WARP's / ProtoVerb's class vectors, PTR's rules: no label map yet
        raise PtuneError(f"task.head={trained_head}: domain transfer maps a linear or word verbalizer head's classes, "
                         f"not those of task.head={trained_head}; evaluate the run on its own task")
    if "head" not in task_cfg:
        raise PtuneError(f"task={task_cfg.name} is not a classification task; domain transfer maps class labels")
    task_cfg = task_cfg.copy()
    if head_given and task_cfg.get("head") != trained_head:
        raise PtuneError(f"task.head={task_cfg.get('head')}: the run was trained with task.head={trained_head}, "
                         f"which is what its adapter can score with; drop task.head")
    task_cfg.head = trained_head
    setup_logging(None)
    backbone, method, trained = load_trained(run_dir, cfg, which)
    new = tasks.build(task_cfg.name, **task_kwargs(OmegaConf.create({"task": task_cfg})))
    if not isinstance(new, ClassificationTask):
        raise PtuneError(f"task={task_cfg.name} is not a classification task; domain transfer maps class labels")
    new.bind(backbone, method)
    mapping = parse_label_map(label_map)
    groups = label_groups(mapping, list(trained.labels), list(new.labels))
    if kind.transfer == "classifier":
        method.attach_head(MappedHead(method.head, groups))
    else:
        method.attach_head(_mapped_verbalizer(backbone, trained, new, groups))
    scores, records = new.evaluate(method, split, batch_size or cfg.trainer.eval_batch_size)
    name = new.result_name(split)
    out = {"run": str(run_dir), "trained_task": cfg.task.name, "task": task_cfg.name, "split": split,
           "adapter": which, "examples": len(records), "metrics": scores,
           "label_map": {trained.labels[c]: new.labels[t] for t, g in enumerate(groups) for c in g},
           "never_predicted": [label for label, g in zip(new.labels, groups) if not g],
           "task_config": OmegaConf.to_container(task_cfg, resolve=True)}
    run_dir.write_eval(name, out)
    run_dir.write_predictions(name, records)
    return out
