"""METEOR 1.5 as the E2E NLG Challenge scores it: meteor-1.5.jar (-l en -norm) through pycocoevalcap's
protocol, corpus score 0..1. Needs Java and the jar; without them the score is
{"unavailable": reason}, never a number.

An `evaluate` module shipped inside ptune: `evaluate.load("<this folder>")`, or
`ptune.metrics.compute("meteor", predictions, references)`. The score itself is
ptune.metrics.e2e.meteor (its docstring says what it follows and how it was checked).
"""
import datasets
import evaluate

from ptune.metrics import e2e

_CITATION = "Denkowski and Lavie 2014, Meteor Universal: Language Specific Translation Evaluation for Any Target Language. WMT."

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    predictions: one raw (untokenized) system output per item.
    references: the item's references, a list of one or more strings (E2E: all references of the MR).
Returns:
    {"meteor": float} or {"meteor": {"unavailable": reason}}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Meteor(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
            reference_urls=["https://github.com/tuetschek/e2e-metrics"],
        )

    def _compute(self, predictions, references):
        try:
            return {"meteor": e2e.meteor(predictions, references)}
        except e2e.MetricUnavailable as err:
            return {"meteor": {"unavailable": err.reason}}
