"""SuperGLUE (Wang et al. 2019) classification tasks of the P-tuning papers: CB, RTE, BoolQ.

- `cb`: CommitmentBank, premise/hypothesis -> entailment, contradiction, neutral; accuracy and
  macro-F1 (SuperGLUE's CB score is their mean; we report both, not the mean).
- `rte`: Recognizing Textual Entailment, premise/hypothesis -> entailment, not_entailment; accuracy.
- `boolq`: a yes/no question about a passage -> false, true; accuracy.

Scored on the validation split (`split=dev`; SuperGLUE's test labels are hidden). Default
verbalizer templates follow PET / LM-BFF (Schick & Schütze 2021; Gao et al. 2021): "{premise} ?
{mask} , {hypothesis}" with Yes / No (/ Maybe), and PET's BoolQ pattern "{passage} . Question:
{question} ? Answer: {mask} .". A causal model reads only what precedes {mask}, so for causal
backbones the NLI default becomes "{premise} Question: {hypothesis} ? Answer: {mask} ." (GPT-3's
style), unless the user gave a template.

Data: `<task.data_dir>/superglue/<task>/{train,val}.jsonl` in the hub's row format (fields as
above, `label` a name such as "entailment", a class index, or for BoolQ true/false), else hub
`super_glue`/<task> (train, validation). BoolQ is not in ../shared/data; its tests write a file.
"""

from __future__ import annotations

from ptune.errors import PtuneError
from ptune.tasks.classification import ClassificationTask
from ptune.tasks.custom import read_jsonl

_FILES = {"train": "train.jsonl", "dev": "val.jsonl"}
_HUB_SPLITS = {"train": "train", "dev": "validation"}
NLI_CAUSAL = "{premise} Question: {hypothesis} ? Answer: {mask} ."


class SuperGlueTask(ClassificationTask):
    def split_rows(self, split: str) -> list[dict]:
        if split not in _FILES:
            raise PtuneError(f"task {self.name} has no labelled split {split!r} (SuperGLUE hides the test labels); "
                             f"use split=dev")
        path = self.local_file("superglue", self.name, _FILES[split])
        if path is None:
            ds = self.hub_split("super_glue", self.name, _HUB_SPLITS[split], f"superglue/{self.name}/{{train,val}}.jsonl")
            return [self._row(dict(r), f"super_glue/{self.name} {split}", n) for n, r in enumerate(ds)]
        return [self._row(raw, str(path), n) for n, raw in read_jsonl(path)]

    def _row(self, raw: dict, where: str, n: int) -> dict:
        missing = [f for f in (*self.fields, "label") if f not in raw]
        if missing:
            raise PtuneError(f"{where}, line {n}: no {missing[0]!r} field; task {self.name} rows need "
                             f"{', '.join(self.fields)} and label")
        return {**{f: str(raw[f]).strip() for f in self.fields}, "label": self._label(raw["label"], where, n)}

    def _label(self, value, where: str, n: int) -> int:
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, int) and 0 <= value < len(self.labels):
            return value
        if isinstance(value, str) and value.lower() in self.labels:
            return self.labels.index(value.lower())
        raise PtuneError(f"{where}, line {n}: label {value!r} is not one of {', '.join(self.labels)} "
                         f"(or 0..{len(self.labels) - 1})")


class CB(SuperGlueTask):
    name = "cb"
    labels = ("entailment", "contradiction", "neutral")  # the hub's class order
    fields = ("premise", "hypothesis")
    default_template = {"linear": "{premise} {hypothesis}", "verbalizer": "{premise} ? {mask} , {hypothesis}",
                        "verbalizer:causal": NLI_CAUSAL}
    default_verbalizer = {"entailment": "Yes", "contradiction": "No", "neutral": "Maybe"}
    metrics = ("accuracy", "macro_f1")


class RTE(SuperGlueTask):
    name = "rte"
    labels = ("entailment", "not_entailment")
    fields = ("premise", "hypothesis")
    default_template = {"linear": "{premise} {hypothesis}", "verbalizer": "{premise} ? {mask} , {hypothesis}",
                        "verbalizer:causal": NLI_CAUSAL}
    default_verbalizer = {"entailment": "Yes", "not_entailment": "No"}


class BoolQ(SuperGlueTask):
    name = "boolq"
    labels = ("false", "true")
    fields = ("question", "passage")
    default_template = {"linear": "{question} {passage}", "verbalizer": "{passage} . Question: {question} ? Answer: {mask} ."}
    default_verbalizer = {"false": "No", "true": "Yes"}
