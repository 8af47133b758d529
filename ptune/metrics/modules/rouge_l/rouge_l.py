"""ROUGE-L as the E2E NLG Challenge scores it: pycocoevalcap's LCS F-measure (beta 1.2) from the best
precision and best recall over the references, averaged over items, 0..1.

An `evaluate` module shipped inside ptune: `evaluate.load("<this folder>")`, or
`ptune.metrics.compute("rouge_l", predictions, references)`. The score itself is
ptune.metrics.e2e.rouge_l (its docstring says what it follows and how it was checked);
the Metric's plumbing is shared with the other E2E scores in ptune.metrics.e2e_modules.
"""
import evaluate

from ptune.metrics import e2e_modules

_CITATION = "Lin 2004, ROUGE: A Package for Automatic Evaluation of Summaries. ACL workshop."


class RougeL(evaluate.Metric):
    def _info(self):
        return e2e_modules.info("rouge_l", __doc__, _CITATION)

    def _compute(self, predictions, references):
        return e2e_modules.compute("rouge_l", predictions, references)
