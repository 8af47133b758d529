"""NIST as the E2E NLG Challenge scores it: mteval-v13a corpus NIST-5, unbounded (E2E baseline 8.5).

An `evaluate` module shipped inside ptune: `evaluate.load("<this folder>")`, or
`ptune.metrics.compute("nist", predictions, references)`. The score itself is
ptune.metrics.e2e.nist (its docstring says what it follows and how it was checked).
"""
import datasets
import evaluate

from ptune.metrics import e2e

_CITATION = "Doddington 2002, Automatic Evaluation of Machine Translation Quality Using N-gram Co-Occurrence Statistics. HLT."

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    predictions: one raw (untokenized) system output per item.
    references: the item's references, a list of one or more strings (E2E: all references of the MR).
Returns:
    {"nist": float}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Nist(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
            reference_urls=["https://github.com/tuetschek/e2e-metrics"],
        )

    def _compute(self, predictions, references):
        return {"nist": e2e.nist(predictions, references)}
