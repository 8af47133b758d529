"""ROUGE-1, ROUGE-2 and ROUGE-L F-measures (XSum's scores), averaged over items, 0..1.

An `evaluate` module shipped inside ptune: `evaluate.load("<this folder>")`, or
`ptune.metrics.compute("rouge", predictions, references)`. Computed with Google's `rouge_score`
package (the re-implementation of ROUGE-1.5.5 that HF's `evaluate` "rouge" and the
run_summarization scripts use): text lowercased, every run of characters other than a-z and 0-9
is a token boundary (so non-ASCII letters are dropped), Porter stemming of tokens longer than 3
characters (`use_stemmer=True`, as ROUGE-1.5.5 with -m and the XSum papers' scripts), F1 of
n-gram overlap (rouge1, rouge2) and of the longest common subsequence (rougeL, summary taken as
one sequence; XSum summaries are one sentence, so it equals rougeLsum there). With several
references per item the best F per score is taken (rouge_score's score_multi).

What differs from HF evaluate's "rouge": the corpus score is the plain mean over items; evaluate's
default aggregator reports the median of 1,000 bootstrap resamples, which is random and needs a
seed to repeat. Papers print these values x100 (e.g. "R-2 16.5").
"""
import evaluate
from rouge_score import rouge_scorer

from ptune.metrics import shipped

_CITATION = "Lin 2004, ROUGE: A Package for Automatic Evaluation of Summaries. ACL workshop."

INPUTS = """
Args:
    predictions: one generated summary per item.
    references: per item one reference (string) or several (list of strings).
    use_stemmer: Porter stemming (default True).
Returns:
    {"rouge1": float, "rouge2": float, "rougeL": float}: mean F-measures, 0..1.
"""

KEYS = ("rouge1", "rouge2", "rougeL")


class Rouge(evaluate.Metric):
    def _info(self):
        return shipped.info(__doc__, _CITATION, INPUTS, [("str", "strs"), ("str", "str")], urls=["https://github.com/google-research/google-research/tree/master/rouge"])

    def _compute(self, predictions, references, use_stemmer=True):
        if not references:
            raise ValueError("ROUGE of no items")
        scorer = rouge_scorer.RougeScorer(list(KEYS), use_stemmer=use_stemmer)
        totals = dict.fromkeys(KEYS, 0.0)
        for pred, refs in zip(predictions, references):
            refs = [refs] if isinstance(refs, str) else refs
            if not refs:
                raise ValueError("an item without references")
            scores = scorer.score_multi(refs, pred)
            for k in KEYS:
                totals[k] += scores[k].fmeasure
        return {k: v / len(references) for k, v in totals.items()}
