"""BLEU as the E2E NLG Challenge scores it: mteval-v13a corpus BLEU-4 (NIST 13a tokenization,
lowercased, smoothed as mteval's default), 0..1.
Computed by ptune.metrics.e2e.bleu.
"""
from ptune.metrics import shipped

Bleu = shipped.e2e_metric(
    "bleu", __doc__, "Papineni et al. 2002, BLEU: a Method for Automatic Evaluation of Machine Translation. ACL.", __name__)
