"""ROUGE-L as the E2E NLG Challenge scores it: pycocoevalcap's LCS F-measure (beta 1.2) from the best
precision and best recall over the references, averaged over items, 0..1.
Computed by ptune.metrics.e2e.rouge_l.
"""
from ptune.metrics import shipped

RougeL = shipped.e2e_metric(
    "rouge_l", __doc__, "Lin 2004, ROUGE: A Package for Automatic Evaluation of Summaries. ACL workshop.", __name__)
