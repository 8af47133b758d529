"""CIDEr as the E2E NLG Challenge scores it: pycocoevalcap's CIDEr-D (n=4, sigma=6, x10) with idf from
the references of the scored corpus, unbounded.

An `evaluate` module shipped inside ptune: `evaluate.load("<this folder>")`, or
`ptune.metrics.compute("cider", predictions, references)`. The score itself is
ptune.metrics.e2e.cider (its docstring says what it follows and how it was checked);
the Metric's plumbing is shared with the other E2E scores in ptune.metrics.e2e_modules.
"""
import evaluate

from ptune.metrics import e2e_modules

_CITATION = "Vedantam et al. 2015, CIDEr: Consensus-based Image Description Evaluation. CVPR."


class Cider(evaluate.Metric):
    def _info(self):
        return e2e_modules.info("cider", __doc__, _CITATION)

    def _compute(self, predictions, references):
        return e2e_modules.compute("cider", predictions, references)
