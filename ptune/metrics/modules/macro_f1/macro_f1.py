"""Macro-F1: the unweighted mean over classes of each class's F1 = 2PR / (P + R), 0..1.

An `evaluate` module shipped inside ptune: `evaluate.load("<this folder>")`, or
`ptune.metrics.compute("macro_f1", predictions, references)`. SuperGLUE's CB score (with accuracy).
The classes are those seen in the references or the predictions, unless `labels=[...]` is passed
(then every listed class counts, also one that never occurs). A class with no true and no predicted
item has P = R = 0 and F1 = 0, as scikit-learn's f1_score(average="macro", zero_division=0); the
SuperGLUE baseline computes CB's F1 with that function.
"""
import evaluate

from ptune.metrics import shipped

_CITATION = "Wang et al. 2019, SuperGLUE: A Stickier Benchmark for General-Purpose Language Understanding Systems. NeurIPS."

INPUTS = """
Args:
    predictions: one predicted label per item (int class index or string).
    references: the gold label per item, of the same type.
    labels (optional): the classes to average over.
Returns:
    {"macro_f1": float}
"""


class MacroF1(evaluate.Metric):
    def _info(self):
        return shipped.info(__doc__, _CITATION, INPUTS, [("int", "int"), ("str", "str")])

    def _compute(self, predictions, references, labels=None):
        if not references:
            raise ValueError("macro-F1 of no items")
        classes = list(labels) if labels is not None else sorted(set(references) | set(predictions))
        f1s = []
        for c in classes:
            tp = sum(p == c and r == c for p, r in zip(predictions, references))
            n_pred, n_true = sum(p == c for p in predictions), sum(r == c for r in references)
            f1s.append(2 * tp / (n_pred + n_true) if tp else 0.0)  # 2PR/(P+R) = 2tp/(n_pred+n_true)
        return {"macro_f1": sum(f1s) / len(f1s)}
