"""E2E NLG Challenge (Novikova et al. 2017): restaurant meaning representations -> one sentence.

The table-to-text task of the prefix-tuning paper. A meaning representation such as
`name[The Eagle], eatType[coffee shop]` is linearized as in Li & Liang's code
(`name : The Eagle | eatType : coffee shop`) and put in `source_template`; the model learns to
continue with the reference text and an end-of-sequence token. The loss covers only the target.

Evaluation groups references by MR (547 dev MRs, 630 test MRs, several references each) and scores
one generated sentence per MR with the official challenge metrics (the `evaluate` modules of
ptune.metrics, computed by ptune.metrics.e2e). Decoding is `task.decoding`: greedy, or beam search
with `task.num_beams` beams (the paper: beam 5); generation stops at a newline, so every output is
one line. `ptune eval run=<dir> split=test` scores the test set's MRs.
Data: `<task.data_dir>/e2e/{train,dev,test}.csv` (columns mr, ref), else hub `GEM/e2e_nlg`.
"""

from __future__ import annotations

import re

from ptune import metrics
from ptune.data import Example, subsample
from ptune.errors import PtuneError
from ptune.generate import beams, encode_sources, generate_texts, target_examples
from ptune.metrics.e2e import METRICS
from ptune.tasks.base import Task
from ptune.tasks.files import read_table

_HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}


def linearize(mr: str) -> str:
    """`name[The Eagle], food[French]` -> `name : The Eagle | food : French`."""
    pairs = re.findall(r"\s*([^\[,]+)\[([^\]]*)\]", mr)
    return " | ".join(f"{k.strip()} : {v.strip()}" for k, v in pairs) if pairs else mr


class E2E(Task):
    name = "e2e"
    metric_for_best = "bleu"
    input_fields = ("mr",)

    @classmethod
    def upgrade(cls, kwargs: dict) -> dict:
        """A run saved before task.decoding existed: num_beams alone chose (1 = greedy)."""
        if "decoding" not in kwargs and "num_beams" in kwargs:
            beams = kwargs["num_beams"]
            kwargs["decoding"] = "beam" if isinstance(beams, int) and beams > 1 else "greedy"
        return kwargs

    def __init__(self, *, source_template: str, decoding: str, num_beams: int, max_new_tokens: int,
                 max_source_len: int, max_target_len: int, metrics: list[str] | None, **kw):
        super().__init__(**kw)

        self.metrics = tuple(metrics or METRICS)
        if set(self.metrics) - set(METRICS):
            raise PtuneError(f"task.metrics={list(self.metrics)} has unknown names; choose from {', '.join(METRICS)}")
        self.source_template = source_template
        self.num_beams, self.max_new_tokens = beams(decoding, num_beams), max_new_tokens
        self.max_source_len, self.max_target_len = max_source_len, max_target_len

    def rows(self, split: str) -> list[tuple[str, str]]:
        """(mr, ref) pairs of a split, in file order."""
        path = self.local_file("e2e", f"{split}.csv")
        if path is not None:
            return [(r["mr"], r["ref"]) for r in read_table(path, ("mr", "ref"), ",")]
        ds = self.hub_split("GEM/e2e_nlg", None, _HUB_SPLITS[split], "e2e/{train,dev,test}.csv")
        return [(r["meaning_representation"], r["target"]) for r in ds]

    def source(self, mr: str) -> str:
        return self.source_template.format(mr=linearize(mr))

    def train_examples(self, tokenizer, kind: str = "causal") -> list[Example]:
        """causal: source + " " + reference + eos in one sequence, loss on the reference part.
        seq2seq: the source (in the tokenizer's own special tokens) feeds the encoder, the reference
        is the decoder's target (generate.target_examples)."""
        if kind not in ("causal", "seq2seq"):
            raise PtuneError(f"task e2e generates text; model.kind={kind} cannot: use a causal or seq2seq model "
                             f"(e.g. model=smollm2-135m or model=t5)")
        rows = self.rows("train")
        rows = [rows[i] for i in subsample(len(rows), self.max_train_samples, self.subsample_seed)]
        src = encode_sources(tokenizer, [self.source(mr) for mr, _ in rows], self.max_source_len, kind)
        return target_examples(tokenizer, src, [ref for _, ref in rows], self.max_target_len, kind)

    def references(self, split: str) -> tuple[list[str], list[list[str]]]:
        """MRs in order of first appearance and their reference lists (subsampled by MR)."""
        grouped: dict[str, list[str]] = {}
        for mr, ref in self.rows(split):
            grouped.setdefault(mr, []).append(ref)
        mrs = list(grouped)
        mrs = [mrs[i] for i in subsample(len(mrs), self.max_eval_samples, self.subsample_seed)]
        return mrs, [grouped[m] for m in mrs]

    def predict(self, method, rows: list[dict], batch_size: int) -> list[str]:
        """One sentence per row; each row needs an `mr` field."""
        if any("mr" not in r for r in rows):
            raise PtuneError("task e2e: every input row needs an 'mr' field (a meaning representation)")
        self.refuse_empty(rows)
        return generate_texts(method, [self.source(r["mr"]) for r in rows], batch_size=batch_size,
                              num_beams=self.num_beams, max_new_tokens=self.max_new_tokens,
                              max_source_len=self.max_source_len)

    def prediction_inputs(self, tokenizer, kind: str, row: dict) -> tuple[list[int], None]:
        return encode_sources(tokenizer, [self.source(row["mr"])], self.max_source_len, kind)[0], None

    def evaluate(self, method, split, batch_size):
        mrs, refs = self.references(split)
        hyps = generate_texts(method, [self.source(m) for m in mrs], batch_size=batch_size, num_beams=self.num_beams,
                              max_new_tokens=self.max_new_tokens, max_source_len=self.max_source_len)
        scores = metrics.scores(self.metrics, hyps, refs)  # an unavailable one: {"unavailable": reason}
        records = [{"mr": m, "prediction": h, "references": r} for m, h, r in zip(mrs, hyps, refs)]
        return scores, records
