"""What a task is: how to load a split, how to encode an example, and how to score predictions."""

from __future__ import annotations

import os
from pathlib import Path

from ptune.data import Example
from ptune.errors import PtuneError


class Task:
    name = "base"
    metric_for_best = "loss"  # a key of evaluate()'s result
    greater_is_better = True

    def __init__(self, data_dir: str | None = None, max_train_samples: int | None = None,
                 max_eval_samples: int | None = None, subsample_seed: int = 0, **_):
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


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
