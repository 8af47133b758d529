"""Metrics, as `evaluate` modules that ship inside ptune: ptune/metrics/modules/<name>/<name>.py.

Call them through one function (tasks do; so can you):

    from ptune import metrics
    metrics.compute("accuracy", [1, 0, 1], [1, 1, 1])            # {"accuracy": 0.6667}
    metrics.compute("macro_f1", ["yes", "no"], ["yes", "yes"])   # labels: ints or strings
    metrics.compute("precision_at_1", [["Paris", "Lyon"]], ["Paris"])  # top-1 string or ranked list
    metrics.compute("rouge", summaries, references)              # {"rouge1", "rouge2", "rougeL"}
    metrics.compute("bleu", sentences, [[ref, ref, ...], ...])    # E2E: bleu nist meteor rouge_l cider
    metrics.scores(["bleu", "nist", "meteor"], sentences, refs)   # several scores by name, in order
    metrics.load("rouge")                                         # the evaluate.EvaluationModule

`compute` returns the module's dict: {score: float}, or {score: {"unavailable": reason}} when the
metric needs something this machine lacks (METEOR: Java and its jar) -- never a made-up number.
Modules load with `evaluate.load(<local folder>)`: no hub, no network (also with
HF_HUB_OFFLINE=1). docs/metrics.md defines every score, its scale and its source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

MODULE_DIR = Path(__file__).resolve().parent / "modules"

# module name -> the score names its compute() returns
MODULES: dict[str, tuple[str, ...]] = {
    "bleu": ("bleu",), "nist": ("nist",), "meteor": ("meteor",), "rouge_l": ("rouge_l",), "cider": ("cider",),
    "rouge": ("rouge1", "rouge2", "rougeL"),
    "accuracy": ("accuracy",), "macro_f1": ("macro_f1",), "precision_at_1": ("precision_at_1",),
}
# score name -> the module that computes it (what a task's `metrics: [...]` list names)
SCORES: dict[str, str] = {score: module for module, names in MODULES.items() for score in names}

_LOADED: dict[str, object] = {}


def module_path(name: str) -> Path:
    """The folder of module `name` (what `evaluate.load` takes)."""
    if name not in MODULES:
        raise ValueError(f"unknown metric module {name!r}; choose from {', '.join(MODULES)}")
    return MODULE_DIR / name


def load(name: str):
    """The evaluate.EvaluationModule of `name`, loaded once per process from ptune's own files.

    keep_in_memory: evaluate would otherwise stage inputs in Arrow files under
    ~/.cache/huggingface/evaluate, with locks shared by every process of the machine."""
    if name not in _LOADED:
        import evaluate

        evaluate.logging.set_verbosity_error()
        _LOADED[name] = evaluate.load(str(module_path(name)), keep_in_memory=True)
    return _LOADED[name]


def compute(name: str, predictions: Sequence, references: Sequence, **kwargs) -> dict:
    """Scores of module `name` for (predictions, references); see the module docstring."""
    return load(name).compute(predictions=list(predictions), references=list(references), **kwargs)


def scores(names: Sequence[str], predictions: Sequence, references: Sequence) -> dict:
    """{score: value} for the score names asked for (e.g. a task's `metrics` list), in that order;
    a module that yields several (rouge) runs once."""
    unknown = [n for n in names if n not in SCORES]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(SCORES)}")
    done: dict[str, dict] = {}
    for n in names:
        module = SCORES[n]
        if module not in done:
            done[module] = compute(module, predictions, references)
    return {n: done[SCORES[n]][n] for n in names}
