"""What the `evaluate` modules shipped in ptune/metrics/modules/<name>/<name>.py share.

Each is loaded with `evaluate.load("<its folder>")` or called as
`ptune.metrics.compute("<name>", predictions, references)`; no hub, no network.

Each module file holds its docstring (the metric's definition), its citation, what its inputs are,
and an `evaluate.Metric` whose `_info` is built here. The five E2E scores (bleu, nist, meteor,
rouge_l, cider) are one class each made by `e2e_metric`: evaluate takes the Metric subclass it
finds in the module's namespace, so the class is created in (and named for) that module rather
than inherited from a base class imported into it, which evaluate could pick instead.
"""

from __future__ import annotations

from ptune.metrics import e2e

_FEATURES = {"int": ("Value", "int64"), "str": ("Value", "string"), "strs": ("Sequence", "string")}

_E2E_INPUTS = """
Args:
    predictions: one raw (untokenized) system output per item.
    references: the item's references, a list of one or more strings (E2E: all references of the MR).
Returns:
    {"<name>": float}, or {"<name>": {"unavailable": reason}} when the score needs what this machine
    lacks (METEOR: Java and meteor-1.5.jar).
"""


def _feature(kind: str):
    import datasets

    wrapper, dtype = _FEATURES[kind]
    value = datasets.Value(dtype)
    return datasets.Sequence(value) if wrapper == "Sequence" else value


def info(description: str, citation: str, inputs: str, signatures: list[tuple[str, str]], urls=None):
    """evaluate.MetricInfo accepting each (predictions kind, references kind) of `signatures`, kinds
    "int" (class index), "str" (one string) or "strs" (a list of strings)."""
    import datasets
    import evaluate

    features = [datasets.Features({"predictions": _feature(p), "references": _feature(r)}) for p, r in signatures]
    return evaluate.MetricInfo(description=description, citation=citation, inputs_description=inputs,
                               features=features[0] if len(features) == 1 else features,
                               **({"reference_urls": urls} if urls else {}))


def e2e_metric(name: str, description: str, citation: str, module: str):
    """The evaluate.Metric class of E2E score `name` (ptune.metrics.e2e.<name>), defined in `module`."""
    import evaluate

    def _info(self):
        return info(description, citation, _E2E_INPUTS.replace("<name>", name), [("str", "strs")],
                    urls=["https://github.com/tuetschek/e2e-metrics"])

    def _compute(self, predictions, references):
        try:
            return {name: getattr(e2e, name)(predictions, references)}
        except e2e.MetricUnavailable as err:
            return {name: {"unavailable": err.reason}}

    cls = type(name.title().replace("_", ""), (evaluate.Metric,), {"_info": _info, "_compute": _compute})
    cls.__module__ = module
    return cls
