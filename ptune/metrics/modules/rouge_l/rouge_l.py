"""ROUGE-L as the E2E NLG Challenge scores it: pycocoevalcap's LCS F-measure (beta 1.2) from the best
precision and best recall over the references, averaged over items, 0..1.

An `evaluate` module shipped inside ptune: `evaluate.load("<this folder>")`, or
`ptune.metrics.compute("rouge_l", predictions, references)`. The score itself is
ptune.metrics.e2e.rouge_l (its docstring says what it follows and how it was checked).
"""
import datasets
import evaluate

from ptune.metrics import e2e

_CITATION = "Lin 2004, ROUGE: A Package for Automatic Evaluation of Summaries. ACL workshop."

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    predictions: one raw (untokenized) system output per item.
    references: the item's references, a list of one or more strings (E2E: all references of the MR).
Returns:
    {"rouge_l": float}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
            reference_urls=["https://github.com/tuetschek/e2e-metrics"],
        )

    def _compute(self, predictions, references):
        return {"rouge_l": e2e.rouge_l(predictions, references)}
