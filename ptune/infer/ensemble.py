"""Prompt ensembles — Lester, Al-Rfou & Constant 2021, "The Power of Scale for Parameter-Efficient
Prompt Tuning", §7: several prompts trained for one task on one frozen backbone are evaluated
together, each example read once per prompt *in one batch*, and their predictions combined.

`ptune eval run=<dir1>,<dir2>,... ensemble=vote|mean [split=dev]`:

- the members must share the backbone (the `model` config) and the task (the `task` config:
  name, head, template, verbalizer, labels, evaluation subset); each may use its own method and
  hyper-parameters as far as the mixed-adapter core (ptune.infer.pool) serves them together;
- every evaluation batch of b examples becomes b * K rows (row i * K + k = example i under member
  k), so one forward of the shared backbone scores all K members (ptune.infer.pool routes each row
  through its own adapter); a linear-head member's own classifier reads its rows' pooled states;
- each member's class probabilities are the softmax over its class scores: the linear head's
  logits, or the verbalizer's log P(label words | x) (so a verbalizer member's probabilities are
  renormalised over the label words, as PET's loss is), a soft verbalizer's logits, ProtoVerb's
  cosines (calibrated where the run set task.calibrate);
- `vote`: the majority of the members' argmax labels (Lester et al.'s rule); a tie between classes
  with the same number of votes goes to the one of them with the largest summed probability over
  the members (then to the lower class index, torch.argmax's first maximum);
- `mean`: the argmax of the members' averaged class probabilities.

Generation tasks are refused: a vote needs outputs that can be counted as equal, and free text
from several prompts has no agreed combination short of re-scoring candidates (not done here).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from ptune import heads
from ptune.build import load_run
from ptune.data import subsample
from ptune.errors import PtuneError
from ptune.infer.pool import Pool
from ptune.rundir import RunDir, write_json

HOWS = ("vote", "mean")


def vote(probs: torch.Tensor) -> torch.Tensor:
    """Majority vote. probs: (K members, n examples, C classes), each row a distribution.

    Returns (n,) class indices: the class most members predict (argmax of their own
    probabilities); among classes tied on votes, the one with the largest probability summed
    over all K members; a remaining exact tie goes to the lowest class index.
    """
    k, n, c = probs.shape
    votes = torch.zeros(n, c, dtype=torch.long)
    votes.scatter_add_(1, probs.argmax(-1).T, torch.ones(n, k, dtype=torch.long))  # (n, C) votes per class
    tied = votes == votes.max(-1, keepdim=True).values  # (n, C): the classes with the most votes
    summed = probs.sum(0).masked_fill(~tied, float("-inf"))  # (n, C)
    return summed.argmax(-1)


def mean(probs: torch.Tensor) -> torch.Tensor:
    """Argmax of the members' mean class probabilities. probs: (K, n, C) -> (n,) class indices."""
    return probs.mean(0).argmax(-1)


def combine(probs: torch.Tensor, how: str) -> torch.Tensor:
    """The ensemble's predictions (n,) from the members' probabilities (K, n, C) by `how`."""
    if how not in HOWS:
        raise PtuneError(f"ensemble={how!r}: choose vote (majority of the members' labels) or mean (mean probabilities)")
    return vote(probs) if how == "vote" else mean(probs)


def check_members(configs: dict) -> None:
    """configs: {run dir: its config.yaml (OmegaConf)}. One line naming the first difference when
    the runs do not share a backbone and a task, or when the task generates text."""
    runs = list(configs)
    if len(runs) < 2:
        raise PtuneError("an ensemble needs at least two runs: ensemble=vote run=<dir1>,<dir2>[,...]")
    first = configs[runs[0]]
    for run in runs[1:]:
        cfg = configs[run]
        for group in ("model", "task"):
            a, b = OmegaConf.to_container(first[group], resolve=True), OmegaConf.to_container(cfg[group], resolve=True)
            if a != b:
                key = next(k for k in ["name", *sorted(set(a) | set(b))] if a.get(k) != b.get(k))  # the name first
                raise PtuneError(f"ensemble members must share {group}: {run} has {group}.{key}={b.get(key)!r}, "
                                 f"{runs[0]} has {a.get(key)!r}")
    head = first.task.get("head", "lm")
    kind = heads.find(head)
    if kind is None or not kind.classifies:
        what = "generates text" if kind is not None and kind.generates else "has no classification head"
        raise PtuneError(f"task={first.task.name} {what} (task.head={head}); ensembles "
                         f"combine class predictions: use a classification task (task.head=linear or verbalizer)")


def member_probs(pool, names: list[str], rows: list[dict], batch_size: int) -> torch.Tensor:
    """(K, n, C) class probabilities of the K adapters `names` of a ptune.infer.pool.Pool on n rows.

    Every batch of `batch_size` examples is replicated for the K members (row j * K + k = example
    j under member k): one forward of the shared backbone per batch and head kind (Pool.class_scores).
    Examples are batched shortest first (less padding), results in input order.
    """
    k = len(names)
    task = pool.adapters[names[0]].task
    lengths = [len(ids) for ids in task.encode(pool.backbone.tokenizer, rows)]
    order = sorted(range(len(rows)), key=lambda i: lengths[i])
    out = torch.empty(k, len(rows), len(task.labels))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        scores = pool.class_scores([{**rows[i], "adapter": name} for i in chunk for name in names])
        for j, i in enumerate(chunk):
            for m in range(k):
                out[m, i] = torch.softmax(scores[j * k + m].float().cpu(), -1)
    return out


def evaluate_ensemble(runs: list[str], how: str, split: str = "dev", which: str = "adapter",
                      batch_size: int | None = None, out: str | None = None, trust_remote_code: bool = False) -> dict:
    """Score each member and their `how` ensemble on `split` in one batched pass; write the result
    JSON (`out`, default <first run>/eval_ensemble_<how>_<split>.json) and return it:
    {"members": [{"run", "method", "metrics"}], "ensemble": {"how", "metrics"}, "examples", ...}."""
    if how not in HOWS:
        raise PtuneError(f"ensemble={how!r}: choose vote (majority of the members' labels) or mean (mean probabilities)")
    configs = {}
    for run in runs:
        run_dir, cfg = load_run(run, trust_remote_code)
        configs[str(run_dir)] = cfg
    if len(configs) < len(runs):
        raise PtuneError(f"run= names a run twice ({','.join(runs)}); an ensemble's members are different runs")
    check_members(configs)
    names = [f"member{k}" for k in range(len(runs))]  # run dirs of a sweep share names (0/, 1/): index them
    pool = Pool.load(dict(zip(names, runs)), which, trust_remote_code)
    task = pool.adapters[names[0]].task
    rows = task.rows(split)
    rows = [rows[i] for i in subsample(len(rows), task.max_eval_samples, task.subsample_seed)]
    first = next(iter(configs.values()))
    probs = member_probs(pool, names, rows, batch_size or first.trainer.eval_batch_size)  # (K, n, C)
    gold = [r["label"] for r in rows]
    preds = combine(probs, how)
    result = {"split": split, "adapter": which, "examples": len(rows), "task": task.name,
              "model": first.model.name, "ensemble": {"how": how, "metrics": task.scores(preds.tolist(), gold)},
              "members": [{"run": run, "method": pool.adapters[n].method.name,
                           "metrics": task.scores(probs[k].argmax(-1).tolist(), gold)}
                          for k, (run, n) in enumerate(zip(runs, names))],
              "predictions": {"labels": list(task.labels), "gold": gold, "ensemble": preds.tolist(),
                              "members": probs.argmax(-1).tolist()}}
    path = Path(out) if out else RunDir(runs[0]).eval_result(f"ensemble_{how}_{split}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, path)
    result["path"] = str(path)
    return result


def table(result: dict) -> str:
    """The members and the ensemble, one line each, every metric a column."""
    keys = list(result["ensemble"]["metrics"])
    width = max(len(m["run"]) for m in result["members"])
    lines = [f"{result['split']}: {result['examples']} examples, {result['task']} on {result['model']}, "
             f"ensemble={result['ensemble']['how']} of {len(result['members'])} runs",
             f"{'':10s} {'run':{width}s} {'method':12s} " + " ".join(f"{k:>9s}" for k in keys)]
    for k, m in enumerate(result["members"]):
        lines.append(f"{'member ' + str(k + 1):10s} {m['run']:{width}s} {m['method']:12s} " +
                     " ".join(f"{m['metrics'][key]:9.4f}" for key in keys))
    lines.append(f"{'ensemble':10s} {result['ensemble']['how']:{width}s} {'':12s} " +
                 " ".join(f"{result['ensemble']['metrics'][key]:9.4f}" for key in keys))
    return "\n".join(lines)
