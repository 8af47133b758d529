"""METEOR 1.5 as the E2E NLG Challenge scores it: meteor-1.5.jar (-l en -norm) through pycocoevalcap's
protocol, corpus score 0..1. Needs Java and the jar; without them the score is
{"unavailable": reason}, never a number.
Computed by ptune.metrics.e2e.meteor.
"""
from ptune.metrics import shipped

Meteor = shipped.e2e_metric(
    "meteor", __doc__, "Denkowski and Lavie 2014, Meteor Universal: Language Specific Translation Evaluation for Any Target Language. WMT.", __name__)
