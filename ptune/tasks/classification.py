"""What every classification task shares: a template, label names, a linear head, accuracy.

A task subclass says where its rows come from (`rows(split)`: dicts of text fields and an integer
`label`), its `labels` (names, in class-index order) and the fields its template may use. This
base turns rows into "class" examples (ptune.data.Example: labels = [class index]) and scores a
method through `ptune.heads.class_logits`.

Input text: `task.template` is a Python format string over the row's fields ("{sentence}"). It
is tokenized with the tokenizer's own special tokens, so each backbone sees its pretraining
format ([CLS] x [SEP] for BERT, x </s> for T5, <s> x </s> for BART, nothing added for GPT-2 and
SmolLM2), truncated to `task.max_len` tokens (P-tuning v2 uses 128).

Heads (`task.head`):
- `linear` (default): `ptune.heads.LinearHead` on the pooled hidden state, as P-tuning v2
  (Liu et al. 2022) and BERT do. One difference from both: they pass [CLS] through BERT's
  pretrained pooler (dense + tanh, trained for next-sentence prediction) before the classifier;
  ptune loads masked backbones as masked LMs, which carry no pooler, so the linear head reads
  [CLS] itself.
- `lm` and `verbalizer` (predicting a label word) are not implemented for classification yet:
  they raise one PtuneError line.
"""

from __future__ import annotations

import string

import torch

from ptune.data import Example, collate, subsample
from ptune.errors import PtuneError
from ptune.heads import class_logits
from ptune.tasks.base import Task

HEADS = ("linear", "lm", "verbalizer")


def accuracy(predictions: list[int], labels: list[int]) -> float:
    """Fraction of predictions equal to their label."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("accuracy of no examples")
    return sum(int(p == y) for p, y in zip(predictions, labels)) / len(labels)


def template_fields(template: str) -> list[str]:
    """Names of the {fields} in a format string, in order (PtuneError if it is not one)."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise PtuneError(f"task.template={template!r} is not a valid format string ({e}); "
                         f"write fields as {{name}} and a literal brace as {{{{ or }}}}") from None


class ClassificationTask(Task):
    metric_for_best = "accuracy"
    labels: tuple[str, ...] = ()  # class names, index = class id
    fields: tuple[str, ...] = ()  # the row fields a template may use

    def __init__(self, template: str = "", head: str = "linear", head_dropout: float = 0.1, max_len: int = 128, **kw):
        super().__init__(**kw)
        if head not in HEADS:
            raise PtuneError(f"task.head={head!r} is not one of {', '.join(HEADS)}; use task.head=linear")
        if head != "linear":
            raise PtuneError(f"task.head={head} is not implemented for task {self.name} yet; use task.head=linear "
                             f"(a trained linear classifier on the pooled hidden state)")
        if not (isinstance(head_dropout, (int, float)) and 0 <= head_dropout < 1):
            raise PtuneError(f"task.head_dropout={head_dropout!r} is invalid: must be a number in [0, 1)")
        if not (isinstance(max_len, int) and max_len >= 2):
            raise PtuneError(f"task.max_len={max_len!r} is invalid: must be an integer >= 2")
        self.template, self.head, self.head_dropout, self.max_len = template, head, float(head_dropout), max_len
        self.template_fields = template_fields(template)  # checked here, not mid-run
        unknown = [f for f in self.template_fields if f not in self.fields]
        if unknown or not self.template_fields:
            what = f"names the field {unknown[0]!r}, which task {self.name} rows lack" if unknown else "names no field"
            raise PtuneError(f"task.template={template!r} {what}; use {', '.join('{' + f + '}' for f in self.fields)}")

    def rows(self, split: str) -> list[dict]:
        """Rows of a split in file order: the text fields and `label` (an int class index)."""
        raise NotImplementedError

    def label_words(self) -> list[str]:
        """The class names in class-index order (prompt init=labels embeds them)."""
        return list(self.labels)

    # -- encoding ------------------------------------------------------------------------------
    def text(self, row: dict) -> str:
        return self.template.format(**{f: row[f] for f in self.template_fields})

    def encode(self, tokenizer, rows: list[dict]) -> list[list[int]]:
        """Token ids of each row's text, with the tokenizer's special tokens, at most max_len long."""
        return tokenizer([self.text(r) for r in rows], truncation=True, max_length=self.max_len).input_ids

    def train_examples(self, tokenizer, kind: str | None = None) -> list[Example]:
        """Examples of layout "class" whatever the backbone kind: the head's pooling adapts to it."""
        rows = self.rows("train")
        rows = [rows[i] for i in subsample(len(rows), self.max_train_samples, self.subsample_seed)]
        return [Example(ids, [r["label"]], "class") for ids, r in zip(self.encode(tokenizer, rows), rows)]

    # -- inference -----------------------------------------------------------------------------
    def classify(self, method, rows: list[dict], batch_size: int) -> list[int]:
        """Predicted class index per row. Rows are batched by length (less padding), results in input order."""
        tok = method.backbone.tokenizer
        encoded = self.encode(tok, rows)
        order = sorted(range(len(rows)), key=lambda i: len(encoded[i]))
        device = next(method.backbone.model.parameters()).device
        out = [0] * len(rows)
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = collate([Example(encoded[i], [0], "class") for i in idx], tok.pad_token_id)
                logits = class_logits(method, batch["input_ids"].to(device), batch["attention_mask"].to(device))
                for i, pred in zip(idx, logits.argmax(-1).tolist()):
                    out[i] = pred
        return out

    def evaluate(self, method, split: str, batch_size: int) -> tuple[dict, list[dict]]:
        """({"accuracy": ...}, one record per example: text, label and prediction as names)."""
        rows = self.rows(split)
        rows = [rows[i] for i in subsample(len(rows), self.max_eval_samples, self.subsample_seed)]
        preds = self.classify(method, rows, batch_size)
        gold = [r["label"] for r in rows]
        records = [{"text": self.text(r), "label": self.labels[y], "prediction": self.labels[p]}
                   for r, y, p in zip(rows, gold, preds)]
        return {"accuracy": accuracy(preds, gold)}, records

    def predict(self, method, rows: list[dict], batch_size: int) -> list[str]:
        """A label name per input row; rows need the fields the template names."""
        missing = [f for f in self.template_fields if any(f not in r for r in rows)]
        if missing:
            raise PtuneError(f"task {self.name}: every input row needs a {missing[0]!r} field (task.template="
                             f"{self.template!r})")
        return [self.labels[p] for p in self.classify(method, rows, batch_size)]
