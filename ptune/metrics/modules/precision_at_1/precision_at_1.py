"""Precision at 1 (P@1): the fraction of queries whose top-ranked prediction is the gold answer, 0..1.

An `evaluate` module shipped inside ptune: `evaluate.load("<this folder>")`, or
`ptune.metrics.compute("precision_at_1", predictions, references)`. LAMA's score (Petroni et al.
2019; P-tuning reports it per relation and averaged): a prediction is either the top-1 answer
(a string) or a ranked list of candidates, best first, of which only the first counts. Answers
are compared as given (LAMA's objects are single vocabulary tokens; strip or lowercase first if
the task's convention asks for it).
"""
import evaluate

from ptune.metrics import shipped

_CITATION = "Petroni et al. 2019, Language Models as Knowledge Bases? EMNLP."

INPUTS = """
Args:
    predictions: per query the top-1 answer (string) or the ranked candidates (list of strings).
    references: the gold answer per query (string).
Returns:
    {"precision_at_1": float}
"""


class PrecisionAt1(evaluate.Metric):
    def _info(self):
        return shipped.info(__doc__, _CITATION, INPUTS, [("str", "str"), ("strs", "str")])

    def _compute(self, predictions, references):
        if not references:
            raise ValueError("P@1 of no queries")
        top = [p if isinstance(p, str) else (p[0] if p else None) for p in predictions]
        return {"precision_at_1": sum(t == r for t, r in zip(top, references)) / len(references)}
