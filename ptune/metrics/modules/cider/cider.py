"""CIDEr as the E2E NLG Challenge scores it: pycocoevalcap's CIDEr-D (n=4, sigma=6, x10) with idf from
the references of the scored corpus, unbounded.

An `evaluate` module shipped inside ptune: `evaluate.load("<this folder>")`, or
`ptune.metrics.compute("cider", predictions, references)`. The score itself is
ptune.metrics.e2e.cider (its docstring says what it follows and how it was checked).
"""
import datasets
import evaluate

from ptune.metrics import e2e

_CITATION = "Vedantam et al. 2015, CIDEr: Consensus-based Image Description Evaluation. CVPR."

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    predictions: one raw (untokenized) system output per item.
    references: the item's references, a list of one or more strings (E2E: all references of the MR).
Returns:
    {"cider": float}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Cider(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
            reference_urls=["https://github.com/tuetschek/e2e-metrics"],
        )

    def _compute(self, predictions, references):
        return {"cider": e2e.cider(predictions, references)}
