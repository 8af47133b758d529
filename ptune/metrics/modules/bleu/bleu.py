"""BLEU as the E2E NLG Challenge scores it: mteval-v13a corpus BLEU-4 (NIST 13a tokenization,
lowercased, smoothed as mteval's default), 0..1.

An `evaluate` module shipped inside ptune: `evaluate.load("<this folder>")`, or
`ptune.metrics.compute("bleu", predictions, references)`. The score itself is
ptune.metrics.e2e.bleu (its docstring says what it follows and how it was checked).
"""
import datasets
import evaluate

from ptune.metrics import e2e

_CITATION = "Papineni et al. 2002, BLEU: a Method for Automatic Evaluation of Machine Translation. ACL."

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    predictions: one raw (untokenized) system output per item.
    references: the item's references, a list of one or more strings (E2E: all references of the MR).
Returns:
    {"bleu": float}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
            reference_urls=["https://github.com/tuetschek/e2e-metrics"],
        )

    def _compute(self, predictions, references):
        return {"bleu": e2e.bleu(predictions, references)}
