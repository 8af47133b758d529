"""SST-2 (Socher et al. 2013; GLUE, Wang et al. 2019): binary sentiment of movie-review sentences.

The GLUE task on which P-tuning v2 (Liu et al. 2022, Table 1) compares deep prompt tuning with
fine-tuning BERT. Labels: 0 negative, 1 positive. Scored by accuracy on the dev split (GLUE's
test labels are hidden, so `split=test` is refused).

Data: `<task.data_dir>/sst2/{train,dev}.tsv` (GLUE's files: header `sentence\\tlabel`, no quoting),
else the hub's `glue`/`sst2` (train, validation). GLUE ends every sentence with a space, which a
byte-level BPE tokenizer would turn into a token of its own: sentences are stripped.
"""

from __future__ import annotations

import csv

from ptune.errors import PtuneError
from ptune.tasks.classification import ClassificationTask
from ptune.tasks.files import read_table

_HUB_SPLITS = {"train": "train", "dev": "validation"}


class SST2(ClassificationTask):
    name = "sst2"
    labels = ("negative", "positive")
    fields = ("sentence",)
    # LM-BFF's manual SST-2 prompt (Gao et al. 2021, Table 1): "<S1> It was [MASK] ." great/terrible
    default_template = {"linear": "{sentence}", "verbalizer": "{sentence} It was {mask} ."}
    default_verbalizer = {"negative": "terrible", "positive": "great"}

    def split_rows(self, split: str) -> list[dict]:
        if split not in _HUB_SPLITS:
            raise PtuneError(f"task sst2 has no labelled split {split!r} (GLUE hides the test labels); use split=dev")
        path = self.local_file("sst2", f"{split}.tsv")
        if path is None:
            ds = self.hub_split("glue", "sst2", _HUB_SPLITS[split], "sst2/{train,dev}.tsv")
            return [{"sentence": r["sentence"].strip(), "label": int(r["label"])} for r in ds]
        rows = read_table(path, ("sentence", "label"), "\t", csv.QUOTE_NONE, exact_header=True,
                          allowed={"label": ("0", "1")})  # 0 negative, 1 positive
        return [{"sentence": r["sentence"].strip(), "label": int(r["label"])} for r in rows]
