"""What a task is: how to load a split, how to encode an example, and how to score predictions.

A task declares what the rest of ptune reads instead of asking its name:
- `head`: a key of ptune.heads.HEADS, which says what it is: "lm" (it generates text), "linear"
  (a trained classifier on the pooled state), "verbalizer" (label words at the template's {mask}),
  "vocab" (the whole vocabulary at {mask}: LAMA), and the learned verbalizers;
- `input_fields`: the fields a row needs for prediction (`ptune predict`, `ptune serve`);
- `prediction_inputs(tokenizer, kind, row)`: the token ids its own predict() feeds the model for
  that row, and the index of {mask} in them (None for generation; under task.head=rules a list, the
  index of every {mask:slot}), so several adapters' rows can share one forward (ptune.infer.pool);
- `soft_positions`: whether prompts sit inside the input (p-tuning's {soft} slots) rather than in front;
- `result_name(split)`: the stem of eval_<...>.json and predictions/<...>.jsonl for this task.
"""

from __future__ import annotations

import os
from pathlib import Path

from ptune.data import Example
from ptune.errors import PtuneError


class Task:
    name = "base"
    metric_for_best = "loss"  # a key of evaluate()'s result
    greater_is_better = True
    head = "lm"  # module docstring
    input_fields: tuple[str, ...] = ()
    soft_positions = False

    @classmethod
    def upgrade(cls, kwargs: dict) -> dict:
        """The keys of a config saved by an older ptune, in today's terms (before the YAML defaults
        fill what is missing); nothing to do by default."""
        return kwargs

    def __init__(self, *, data_dir: str | None, max_train_samples: int | None, max_eval_samples: int | None,
                 subsample_seed: int, **_):
        self.data_dir = Path(data_dir) if data_dir else None
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.subsample_seed = subsample_seed

    def local_file(self, *parts: str) -> Path | None:
        """A file under task.data_dir, or None when data come from the hub."""
        if self.data_dir is None:
            return None
        path = self.data_dir.joinpath(*parts)
        if not path.exists():
            raise PtuneError(f"task {self.name}: {path} does not exist; set task.data_dir (or PTUNE_DATA_DIR) "
                             f"to a folder holding {'/'.join(parts)}, or unset it to load from the hub")
        return path

    def hub_split(self, path: str, config: str | None, split: str, local: str):
        """A split of a hub dataset through `datasets`, or one PtuneError line naming the local
        alternative (`local`: what task.data_dir must hold) when it cannot be had (offline, ...)."""
        import datasets

        try:
            return datasets.load_dataset(path, config, split=split)
        except Exception as e:  # ConnectionError offline, DatasetNotFoundError, ...: all mean "not from the hub"
            name = f"{path}/{config}" if config else path
            raise PtuneError(f"task {self.name}: the hub's {name} ({split}) cannot be loaded ({type(e).__name__}); set "
                             f"task.data_dir (or PTUNE_DATA_DIR) to a folder with {local}") from None

    def train_examples(self, tokenizer, kind: str = "causal") -> list[Example]:
        """Tokenized training examples. kind is the backbone's (`Backbone.kind`): it decides the
        layout of generation examples (causal: source + target in one sequence; seq2seq: source
        for the encoder, target for the decoder)."""
        raise NotImplementedError

    def evaluate(self, method, split: str, batch_size: int) -> tuple[dict, list[dict]]:
        """(metrics by name, one prediction record per example)."""
        raise NotImplementedError

    def predict(self, method, rows: list[dict], batch_size: int) -> list[str]:
        """One answer per row (a label name or a generated text), in order."""
        raise NotImplementedError

    def refuse_empty(self, rows: list[dict]) -> None:
        """One PtuneError line for the first row whose input field is empty text: it would encode to
        no tokens, which no head can read (every predict() and the pool call this)."""
        for i, row in enumerate(rows):
            for field in self.input_fields:
                value = row.get(field)
                if isinstance(value, str) and not value.strip():
                    raise PtuneError(f"task {self.name}: input {i} has an empty {field!r}; give it some text")

    def prediction_inputs(self, tokenizer, kind: str, row: dict) -> tuple[list[int], int | None]:
        """(token ids predict() feeds the model for `row`, index of {mask} in them or None)."""
        raise PtuneError(f"task {self.name} does not answer single rows together with other adapters; run it alone")

    def label_words(self) -> list | None:
        """Per class its label word(s) (classification tasks); None for tasks without classes."""
        return None

    def init_label_words(self, kind: str) -> list | None:
        """What prompt tuning's method.init=labels embeds on a backbone of this kind: label_words() by
        default (classification tasks: the words as their verbalizer tokenizes them)."""
        return self.label_words()

    def bind(self, backbone, method) -> None:
        """Check the task against the backbone and method it will run with (ptune.build); nothing by default."""

    def result_name(self, split: str) -> str:
        return f"{self.name}_{split}"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
