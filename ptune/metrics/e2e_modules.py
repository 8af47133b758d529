"""What the five E2E `evaluate` modules (modules/{bleu,nist,meteor,rouge_l,cider}) share.

Each module file holds only its docstring, its citation and an `evaluate.Metric` subclass whose
`_info` and `_compute` call these two functions (evaluate takes a module's first Metric subclass as
its metric, so a shared base class cannot live here).
"""

from __future__ import annotations

from ptune.metrics import e2e

_INPUTS = """
Args:
    predictions: one raw (untokenized) system output per item.
    references: the item's references, a list of one or more strings (E2E: all references of the MR).
Returns:
    {"<name>": float}, or {"<name>": {"unavailable": reason}} when the score needs what this machine
    lacks (METEOR: Java and meteor-1.5.jar).
"""


def info(name: str, description: str, citation: str):
    """MetricInfo of E2E score `name`: a string per item and a list of references per item."""
    import datasets
    import evaluate

    return evaluate.MetricInfo(
        description=description, citation=citation, inputs_description=_INPUTS.replace("<name>", name),
        features=datasets.Features({"predictions": datasets.Value("string"),
                                    "references": datasets.Sequence(datasets.Value("string"))}),
        reference_urls=["https://github.com/tuetschek/e2e-metrics"],
    )


def compute(name: str, predictions, references) -> dict:
    """{name: score} by ptune.metrics.e2e.<name>, or {name: {"unavailable": reason}}."""
    try:
        return {name: getattr(e2e, name)(predictions, references)}
    except e2e.MetricUnavailable as err:
        return {name: {"unavailable": err.reason}}
