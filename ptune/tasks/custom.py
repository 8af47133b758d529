"""The user's own data: a CSV, TSV or JSONL file per split (by extension), columns mapped by config.

    ptune train task=custom task.train_file=reviews.csv task.eval_file=dev.csv model=minilm method=prompt

- `task.type=classification` (default): `task.text_column` (or `task.text_columns: [a, b]`) is the
  input, `task.label_column` the class. Labels are read from the training file (sorted, so the
  class order does not depend on row order) unless `task.labels` lists them; an evaluation label
  outside them is an error. Heads as every classification task (ptune.tasks.classification):
  `linear` by default, or `verbalizer` with a `task.template` holding {mask} and `task.verbalizer`
  (default: each label's own name is its word). Accuracy and macro-F1.
- `task.type=generation`: the text columns through `task.template` form the source, the label
  column is the target text; causal or seq2seq models, greedy decoding; exact match and ROUGE-L
  (ptune.metrics.e2e.rouge_l, one reference per row).

File checks (one line each, before a run directory exists): a missing file, an unknown extension, a
missing column, a row with an empty text or label, a bad JSON line, a CSV/TSV written with the
other delimiter (ptune.tasks.files.read_table). Relative paths are read from the current directory.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ptune.config import group_defaults
from ptune.data import subsample
from ptune.errors import PtuneError
from ptune.generate import encode_sources, generate_texts, target_examples
from ptune.heads import HEAD_KEYS, yaml_value
from ptune.metrics.e2e import rouge_l
from ptune.tasks.base import Task
from ptune.tasks.classification import ClassificationTask
from ptune.tasks.files import read_table
from ptune.tasks.templates import Template

TYPES = ("classification", "generation")
# The keys that one task.type alone reads: under the other type a value away from conf/task/custom.yaml's
# default would be accepted and ignored, so it is refused (unread).
GENERATION_KEYS = ("max_target_len", "max_new_tokens")
CLASSIFICATION_KEYS = ("head", "labels", "verbalizer", "triggers", "few_shot", "few_shot_seed", "demonstrations",
                       "demo_sets", "demo_encoder", "calibrate", *HEAD_KEYS)
FORMATS = (".csv", ".tsv", ".jsonl")


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) per non-blank line of a JSON-lines file; one PtuneError line for a line
    that is not a JSON object or a file without any."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise PtuneError(f"{path}, line {n}: not valid JSON ({e.msg}); one JSON object per line") from None
        if not isinstance(raw, dict):
            raise PtuneError(f"{path}, line {n}: not a JSON object; one object per line")
        out.append((n, raw))
    if not out:
        raise PtuneError(f"{path} holds no rows")
    return out


def _check_header(path: Path, columns: list[str], delimiter: str) -> None:
    """Name the config key to set when a column is missing (read_table reports the rest: a wrong
    delimiter shows as a one-column header, and is left to it)."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(f, delimiter=delimiter), [])
    missing = [c for c in columns if c not in header]
    if len(header) > 1 and missing:
        raise PtuneError(f"{path}: no column {missing[0]!r} (it has {', '.join(header)}); set task.text_column / "
                         f"task.text_columns and task.label_column to the file's column names")


def read_records(path: str | None, columns: list[str], key: str) -> list[dict]:
    """Rows of a .csv / .tsv / .jsonl file with the given columns, all non-empty text."""
    if not path:
        raise PtuneError(f"task=custom needs {key}=<file.csv|.tsv|.jsonl>")
    p = Path(path).expanduser()
    if not p.is_file():
        raise PtuneError(f"{key}={path}: no such file")
    suffix = p.suffix.lower()
    if suffix not in FORMATS:
        raise PtuneError(f"{key}={path}: unknown format {suffix or '(no extension)'!r}; use .csv, .tsv or .jsonl")
    if suffix in (".csv", ".tsv"):
        delimiter = "\t" if suffix == ".tsv" else ","
        _check_header(p, columns, delimiter)
        return read_table(p, tuple(columns), delimiter)
    rows = []
    for n, raw in read_jsonl(p):
        missing = [c for c in columns if c not in raw]
        if missing:
            raise PtuneError(f"{p}, line {n}: no {missing[0]!r} field; set task.text_column(s) / task.label_column "
                             f"to the file's names (it has {', '.join(raw)})")
        row = {c: "" if raw[c] is None else str(raw[c]) for c in columns}
        empty = next((c for c in columns if not row[c].strip()), None)
        if empty:
            raise PtuneError(f"{p}, line {n}: empty {empty!r}; every row needs text in {', '.join(columns)}")
        rows.append(row)
    return rows


def _columns(text_column, text_columns) -> list[str]:
    cols = list(text_columns) if text_columns else [text_column]
    if not cols or not all(isinstance(c, str) and c for c in cols):
        raise PtuneError(f"task.text_columns={text_columns!r} / task.text_column={text_column!r}: name the input column(s)")
    return cols


def result_name(task, split: str) -> str:
    """eval_<name>.json / predictions/<name>.jsonl stem: custom-<eval file stem>_<split>, so two
    custom files scored from one run do not overwrite each other."""
    eval_file = task.files.get("dev")
    return f"custom-{Path(str(eval_file)).stem}_{split}" if eval_file else f"custom_{split}"


class CustomClassification(ClassificationTask):
    name = "custom"
    metrics = ("accuracy", "macro_f1")
    result_name = result_name

    def __init__(self, *, train_file: str | None, eval_file: str | None, text_column: str,
                 text_columns: list[str] | None, label_column: str, labels: list | None, verbalizer: dict | None, **kw):
        self.files = {"train": train_file, "dev": eval_file}
        self.fields = tuple(_columns(text_column, text_columns))
        self.label_column = label_column
        self.default_template = {"linear": " ".join("{" + c + "}" for c in self.fields)}
        self._cache: dict[str, list[dict]] = {}
        if labels:
            self.labels = tuple(str(x) for x in labels)
        else:  # read from the training data: sorted names, a stable class order
            self.labels = tuple(sorted({r[label_column].strip() for r in self._read("train")}))
        if len(self.labels) < 2:
            raise PtuneError(f"task=custom: {len(self.labels)} label(s) ({', '.join(self.labels)}) in column "
                             f"{label_column!r} of task.train_file; classification needs at least 2")
        self.default_verbalizer = {label: label for label in self.labels}
        super().__init__(verbalizer=verbalizer, **kw)

    def _read(self, split: str) -> list[dict]:
        if split not in self.files:
            raise PtuneError(f"task=custom has splits train and dev (task.eval_file), not {split!r}")
        if split not in self._cache:
            key = "task.train_file" if split == "train" else "task.eval_file"
            self._cache[split] = read_records(self.files[split], [*self.fields, self.label_column], key)
        return self._cache[split]

    def split_rows(self, split: str) -> list[dict]:
        out = []
        for n, r in enumerate(self._read(split), start=1):
            label = r[self.label_column].strip()
            if label not in self.labels:
                raise PtuneError(f"{self.files[split]}: row {n} has label {label!r}, which is not one of the task's "
                                 f"labels ({', '.join(self.labels)}); add it to task.labels (and task.verbalizer)")
            out.append({**{f: r[f] for f in self.fields}, "label": self.labels.index(label)})
        return out


class CustomGeneration(Task):
    name = "custom"
    metric_for_best = "rouge_l"
    result_name = result_name

    def __init__(self, *, train_file: str | None, eval_file: str | None, text_column: str,
                 text_columns: list[str] | None, label_column: str, template: str | None, max_len: int,
                 max_target_len: int, max_new_tokens: int, **kw):
        super().__init__(**{k: v for k, v in kw.items() if k in ("data_dir", "max_train_samples", "max_eval_samples",
                                                                     "subsample_seed")})
        self.files = {"train": train_file, "dev": eval_file}
        self.fields = _columns(text_column, text_columns)
        self.label_column = label_column
        self.template = Template(template or " ".join("{" + c + "}" for c in self.fields))
        self.template.check_fields(self.fields, self.name)
        if self.template.has_mask or self.template.n_soft or self.template.n_trigger:
            raise PtuneError(f"task.template={self.template.source!r}: task.type=generation continues the text; "
                             f"{{mask}}, {{soft}} and {{trigger}} slots are for classification")
        self.max_len, self.max_target_len, self.max_new_tokens = max_len, max_target_len, max_new_tokens

    def _pairs(self, split: str) -> list[tuple[str, str]]:
        key = "task.train_file" if split == "train" else "task.eval_file"
        if split not in self.files:
            raise PtuneError(f"task=custom has splits train and dev (task.eval_file), not {split!r}")
        rows = read_records(self.files[split], [*self.fields, self.label_column], key)
        return [(self.template.render(r), r[self.label_column]) for r in rows]

    def train_examples(self, tokenizer, kind: str = "causal"):
        if kind not in ("causal", "seq2seq"):
            raise PtuneError(f"task.type=generation generates text; model.kind={kind} cannot: use a causal or "
                             f"seq2seq model")
        pairs = self._pairs("train")
        pairs = [pairs[i] for i in subsample(len(pairs), self.max_train_samples, self.subsample_seed)]
        src = encode_sources(tokenizer, [s for s, _ in pairs], self.max_len, kind)
        return target_examples(tokenizer, src, [t for _, t in pairs], self.max_target_len, kind)

    @property
    def input_fields(self) -> tuple[str, ...]:
        return tuple(self.fields)

    def prediction_inputs(self, tokenizer, kind: str, row: dict) -> tuple[list[int], None]:
        return encode_sources(tokenizer, [self.template.render(row)], self.max_len, kind)[0], None

    def _generate(self, method, sources: list[str], batch_size: int) -> list[str]:
        return generate_texts(method, sources, batch_size=batch_size, num_beams=1, max_new_tokens=self.max_new_tokens,
                              max_source_len=self.max_len)

    def evaluate(self, method, split: str, batch_size: int):
        pairs = self._pairs(split)
        pairs = [pairs[i] for i in subsample(len(pairs), self.max_eval_samples, self.subsample_seed)]
        hyps = self._generate(method, [s for s, _ in pairs], batch_size)
        refs = [t for _, t in pairs]
        scores = {"exact_match": sum(h.strip() == r.strip() for h, r in zip(hyps, refs)) / len(refs),
                  "rouge_l": rouge_l(hyps, [[r] for r in refs])}
        return scores, [{"text": s, "label": r, "prediction": h} for (s, r), h in zip(pairs, hyps)]

    def predict(self, method, rows: list[dict], batch_size: int) -> list[str]:
        missing = [f for f in self.fields if any(f not in r for r in rows)]
        if missing:
            raise PtuneError(f"task custom: every input row needs a {missing[0]!r} field")
        self.refuse_empty(rows)
        return self._generate(method, [self.template.render(r) for r in rows], batch_size)


def Custom(*, type: str, **kw) -> Task:  # noqa: N802 -- the registry calls it like a class
    """task=custom: the classification or generation variant, by `task.type`."""
    if type not in TYPES:
        raise PtuneError(f"task.type={type!r} is not one of {', '.join(TYPES)}")
    if kw.get("data_dir") is not None:
        raise PtuneError(f"task.data_dir={kw['data_dir']}: task=custom reads task.train_file and task.eval_file as given "
                         f"(relative to the current directory), not from a data folder; drop task.data_dir")
    if type == "generation":
        if kw.get("head") is not None:
            raise PtuneError(f"task.head={kw['head']} is a classification head; task.type=generation writes text with "
                             f"the LM itself: drop task.head")
        if kw.get("few_shot") is not None:
            raise PtuneError(f"task.few_shot={kw['few_shot']} draws K examples per class; task.type=generation has no "
                             f"classes: use task.max_train_samples")
        if kw.get("demonstrations") is not None:
            raise PtuneError(f"task.demonstrations={kw['demonstrations']} shows one example per class; "
                             f"task.type=generation has no classes: drop task.demonstrations")
        unread(kw, CLASSIFICATION_KEYS, "generation", "classification")
        return CustomGeneration(**kw)
    unread(kw, GENERATION_KEYS, "classification", "generation")
    return CustomClassification(**{**kw, "head": kw.get("head") or "linear"})  # null: the classifier


def unread(kw: dict, keys: tuple[str, ...], type: str, other: str) -> None:  # noqa: A002 -- task.type
    """Refuse the first of `keys` (the other type's) set away from conf/task/custom.yaml's default,
    then drop them all from kw: task.type=`type` does not read them."""
    defaults = group_defaults("task", "custom")
    for key in keys:
        if key in kw and kw[key] != defaults[key]:
            raise PtuneError(f"task.{key}={yaml_value(kw[key])} is read by task.type={other} alone, and task.type={type} "
                             f"would ignore it; set task.type={other}, or leave task.{key}={yaml_value(defaults[key])}")
    for key in keys:
        kw.pop(key, None)


Custom.upgrade = Task.upgrade  # the registry calls it as on a class: nothing to upgrade
