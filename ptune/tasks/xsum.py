"""XSum (Narayan et al. 2018): a BBC article -> its one-sentence summary, scored by ROUGE-1/2/L.

The summarization task of the prefix-tuning paper (Li & Liang 2021, with BART-large). Two layouts,
as for E2E (generate.target_examples):
- seq2seq (T5, BART): `task.source_template` with the document feeds the encoder; the summary is
  the decoder's target.
- causal (GPT-2, SmolLM2, Llama): the source, then " " + summary + eos in one sequence, loss on
  the summary only. The default template ends the document with " TL;DR:", the cue GPT-2 was
  shown to summarize after (Radford et al. 2019); T5 users may prefer "summarize: {document}".
Documents are cut to their first `task.max_source_length` tokens (a news article leads with its
point); the template's own words are never cut. Decoding as E2E: `task.decoding` greedy or beam
(`task.num_beams`), stopping at a newline, so a summary is one line.

Data: with `task.data_dir`, `<data_dir>/xsum/test.jsonl` (fields document, summary, id), the
1,000 test articles of ../shared/data; having no training split, it is cut by position into train
(the first 1,000 - local_dev_size - local_test_size), dev (the next local_dev_size) and test (the
last local_test_size). That tests the summarization path end to end, not the paper's numbers.
Without data_dir: hub `EdinburghNLP/xsum` and its real train/validation/test splits.
"""

from __future__ import annotations

from ptune import metrics
from ptune.data import Example, subsample
from ptune.errors import PtuneError
from ptune.generate import beams, encode_sources, generate_from_ids, target_examples
from ptune.metrics import MODULES
from ptune.tasks.base import Task
from ptune.tasks.custom import read_jsonl

_HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}
SPLITS = tuple(_HUB_SPLITS)


class XSum(Task):
    name = "xsum"
    metric_for_best = "rouge2"
    input_fields = ("document",)

    def __init__(self, *, source_template: str, decoding: str, num_beams: int, max_new_tokens: int,
                 max_source_length: int, max_target_len: int, local_dev_size: int, local_test_size: int,
                 metrics: list[str] | None, **kw):
        super().__init__(**kw)

        self.metrics = tuple(metrics or MODULES["rouge"])
        if not self.metrics or set(self.metrics) - set(MODULES["rouge"]):
            raise PtuneError(f"task.metrics={list(self.metrics)} is invalid: choose from {', '.join(MODULES['rouge'])}")
        if source_template.count("{document}") != 1:
            raise PtuneError(f"task.source_template={source_template!r} is invalid: it must hold {{document}} once")
        for key, value in (("max_source_length", max_source_length), ("max_new_tokens", max_new_tokens),
                           ("max_target_len", max_target_len), ("local_dev_size", local_dev_size),
                           ("local_test_size", local_test_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PtuneError(f"task.{key}={value!r} is invalid: must be an integer >= 1")
        self.source_template = source_template
        self.num_beams, self.max_new_tokens = beams(decoding, num_beams), max_new_tokens
        self.max_source_length, self.max_target_len = max_source_length, max_target_len
        self.local_sizes = {"dev": local_dev_size, "test": local_test_size}

    # -- data ---------------------------------------------------------------------------------------
    def rows(self, split: str) -> list[dict]:
        """{document, summary, id} rows of a split, in file order."""
        if split not in SPLITS:
            raise PtuneError(f"task xsum has no split {split!r}; choose one of {', '.join(SPLITS)}")
        path = self.local_file("xsum", "test.jsonl")
        if path is None:
            ds = self.hub_split("EdinburghNLP/xsum", None, _HUB_SPLITS[split], "xsum/test.jsonl")
            return [{"document": r["document"], "summary": r["summary"], "id": r["id"]} for r in ds]
        rows = _read_jsonl(path)
        n_dev, n_test = self.local_sizes["dev"], self.local_sizes["test"]
        n_train = len(rows) - n_dev - n_test
        if n_train < 1:
            raise PtuneError(f"{path} holds {len(rows)} articles, too few for task.local_dev_size={n_dev} and "
                             f"task.local_test_size={n_test} plus at least one to train on; lower them")
        bounds = {"train": (0, n_train), "dev": (n_train, n_train + n_dev), "test": (n_train + n_dev, len(rows))}
        start, end = bounds[split]
        return rows[start:end]

    def sources(self, tokenizer, documents: list[str], kind: str) -> list[list[int]]:
        """Token ids of each source: the template around the document's first max_source_length tokens."""
        ids = tokenizer(documents, add_special_tokens=False).input_ids
        cut = [d if len(i) <= self.max_source_length else tokenizer.decode(i[:self.max_source_length])
               for d, i in zip(documents, ids)]
        texts = [self.source_template.replace("{document}", d) for d in cut]
        # The cut document is re-tokenized inside the template, which may shift a few tokens at its
        # edges; the room for them comes from the template's own length plus a margin, and
        # encode_sources keeps a text's end, so the template's cue is never lost.
        overhead = len(tokenizer(self.source_template.replace("{document}", ""), add_special_tokens=False).input_ids)
        return encode_sources(tokenizer, texts, self.max_source_length + overhead + 8, kind)

    def train_examples(self, tokenizer, kind: str = "causal") -> list[Example]:
        if kind not in ("causal", "seq2seq"):
            raise PtuneError(f"task xsum generates text; model.kind={kind} cannot: use a causal or seq2seq model "
                             f"(e.g. model=t5, model=bart or model=smollm2-135m)")
        rows = self.rows("train")
        rows = [rows[i] for i in subsample(len(rows), self.max_train_samples, self.subsample_seed)]
        src = self.sources(tokenizer, [r["document"] for r in rows], kind)
        return target_examples(tokenizer, src, [r["summary"] for r in rows], self.max_target_len, kind)

    # -- generation and scores ----------------------------------------------------------------------
    def _summarize(self, method, documents: list[str], batch_size: int) -> list[str]:
        src = self.sources(method.backbone.tokenizer, documents, method.backbone.kind)  # as in training
        return generate_from_ids(method, src, batch_size=batch_size, num_beams=self.num_beams,
                                 max_new_tokens=self.max_new_tokens)

    def predict(self, method, rows: list[dict], batch_size: int) -> list[str]:
        """One summary per row; each row needs a `document` field."""
        if any(not isinstance(r.get("document"), str) for r in rows):
            raise PtuneError("task xsum: every input row needs a 'document' field (the article text)")
        self.refuse_empty(rows)
        return self._summarize(method, [r["document"] for r in rows], batch_size)

    def prediction_inputs(self, tokenizer, kind: str, row: dict) -> tuple[list[int], None]:
        return self.sources(tokenizer, [row["document"]], kind)[0], None

    def evaluate(self, method, split, batch_size):
        rows = self.rows(split)
        rows = [rows[i] for i in subsample(len(rows), self.max_eval_samples, self.subsample_seed)]
        hyps = self._summarize(method, [r["document"] for r in rows], batch_size)
        refs = [[r["summary"]] for r in rows]
        scores = metrics.scores(self.metrics, hyps, refs)
        records = [{"id": r["id"], "prediction": h, "references": ref} for r, h, ref in zip(rows, hyps, refs)]
        return scores, records


def _read_jsonl(path) -> list[dict]:
    """{document, summary, id} per line of an XSum JSON-lines file (custom.read_jsonl checks the JSON)."""
    rows = []
    for n, row in read_jsonl(path):
        if not all(isinstance(row.get(k), str) and row[k].strip() for k in ("document", "summary")):
            raise PtuneError(f"{path}, line {n}: needs non-empty text fields document and summary")
        rows.append({"document": row["document"], "summary": row["summary"], "id": str(row.get("id", n))})
    return rows
