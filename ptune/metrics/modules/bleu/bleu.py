"""BLEU as the E2E NLG Challenge scores it: mteval-v13a corpus BLEU-4 (NIST 13a tokenization,
lowercased, smoothed as mteval's default), 0..1.

An `evaluate` module shipped inside ptune: `evaluate.load("<this folder>")`, or
`ptune.metrics.compute("bleu", predictions, references)`. The score itself is
ptune.metrics.e2e.bleu (its docstring says what it follows and how it was checked);
the Metric's plumbing is shared with the other E2E scores in ptune.metrics.e2e_modules.
"""
import evaluate

from ptune.metrics import e2e_modules

_CITATION = "Papineni et al. 2002, BLEU: a Method for Automatic Evaluation of Machine Translation. ACL."


class Bleu(evaluate.Metric):
    def _info(self):
        return e2e_modules.info("bleu", __doc__, _CITATION)

    def _compute(self, predictions, references):
        return e2e_modules.compute("bleu", predictions, references)
