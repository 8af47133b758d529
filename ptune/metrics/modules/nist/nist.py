"""NIST as the E2E NLG Challenge scores it: mteval-v13a corpus NIST-5, unbounded (E2E baseline 8.5).

An `evaluate` module shipped inside ptune: `evaluate.load("<this folder>")`, or
`ptune.metrics.compute("nist", predictions, references)`. The score itself is
ptune.metrics.e2e.nist (its docstring says what it follows and how it was checked);
the Metric's plumbing is shared with the other E2E scores in ptune.metrics.e2e_modules.
"""
import evaluate

from ptune.metrics import e2e_modules

_CITATION = "Doddington 2002, Automatic Evaluation of Machine Translation Quality Using N-gram Co-Occurrence Statistics. HLT."


class Nist(evaluate.Metric):
    def _info(self):
        return e2e_modules.info("nist", __doc__, _CITATION)

    def _compute(self, predictions, references):
        return e2e_modules.compute("nist", predictions, references)
