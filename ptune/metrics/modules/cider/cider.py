"""CIDEr as the E2E NLG Challenge scores it: pycocoevalcap's CIDEr-D (n=4, sigma=6, x10) with idf from
the references of the scored corpus, unbounded.
Computed by ptune.metrics.e2e.cider.
"""
from ptune.metrics import shipped

Cider = shipped.e2e_metric(
    "cider", __doc__, "Vedantam et al. 2015, CIDEr: Consensus-based Image Description Evaluation. CVPR.", __name__)
