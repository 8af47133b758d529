"""Accuracy: the fraction of items whose predicted label equals the reference label, 0..1.

An `evaluate` module shipped inside ptune: `evaluate.load("<this folder>")`, or
`ptune.metrics.compute("accuracy", predictions, references)`. Labels are class indices or label
strings (both sides alike). Used by the classification tasks (SST-2, CB, RTE, BoolQ).
"""
import evaluate

from ptune.metrics import shipped

_CITATION = "Wang et al. 2019, GLUE (accuracy as reported for SST-2); Wang et al. 2019, SuperGLUE."

INPUTS = """
Args:
    predictions: one predicted label per item (int class index or string).
    references: the gold label per item, of the same type.
Returns:
    {"accuracy": float}: correct / items.
"""


class Accuracy(evaluate.Metric):
    def _info(self):
        return shipped.info(__doc__, _CITATION, INPUTS, [("int", "int"), ("str", "str")])

    def _compute(self, predictions, references):
        if not references:
            raise ValueError("accuracy of no items")
        return {"accuracy": sum(p == r for p, r in zip(predictions, references)) / len(references)}
