"""NIST as the E2E NLG Challenge scores it: mteval-v13a corpus NIST-5, unbounded (E2E baseline 8.5).
Computed by ptune.metrics.e2e.nist.
"""
from ptune.metrics import shipped

Nist = shipped.e2e_metric(
    "nist", __doc__, "Doddington 2002, Automatic Evaluation of Machine Translation Quality Using N-gram Co-Occurrence Statistics. HLT.", __name__)
