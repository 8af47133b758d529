"""Accuracy: the fraction of items whose predicted label equals the reference label, 0..1.

An `evaluate` module shipped inside ptune: `evaluate.load("<this folder>")`, or
`ptune.metrics.compute("accuracy", predictions, references)`. Labels are class indices or label
strings (both sides alike). Used by the classification tasks (SST-2, CB, RTE, BoolQ).
"""
import datasets
import evaluate

_CITATION = "Wang et al. 2019, GLUE (accuracy as reported for SST-2); Wang et al. 2019, SuperGLUE."

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    predictions: one predicted label per item (int class index or string).
    references: the gold label per item, of the same type.
Returns:
    {"accuracy": float}: correct / items.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=[datasets.Features({"predictions": datasets.Value("int64"),
                                         "references": datasets.Value("int64")}),
                      datasets.Features({"predictions": datasets.Value("string"),
                                         "references": datasets.Value("string")})],
        )

    def _compute(self, predictions, references):
        if not references:
            raise ValueError("accuracy of no items")
        return {"accuracy": sum(p == r for p, r in zip(predictions, references)) / len(references)}
