"""METEOR 1.5 as the E2E NLG Challenge scores it: meteor-1.5.jar (-l en -norm) through pycocoevalcap's
protocol, corpus score 0..1. Needs Java and the jar; without them the score is
{"unavailable": reason}, never a number.

An `evaluate` module shipped inside ptune: `evaluate.load("<this folder>")`, or
`ptune.metrics.compute("meteor", predictions, references)`. The score itself is
ptune.metrics.e2e.meteor (its docstring says what it follows and how it was checked);
the Metric's plumbing is shared with the other E2E scores in ptune.metrics.e2e_modules.
"""
import evaluate

from ptune.metrics import e2e_modules

_CITATION = "Denkowski and Lavie 2014, Meteor Universal: Language Specific Translation Evaluation for Any Target Language. WMT."


class Meteor(evaluate.Metric):
    def _info(self):
        return e2e_modules.info("meteor", __doc__, _CITATION)

    def _compute(self, predictions, references):
        return e2e_modules.compute("meteor", predictions, references)
