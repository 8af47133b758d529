"""Test setup: offline, data from ../shared/data, tiny models only (built in-process)."""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("PTUNE_DATA_DIR", str((ROOT.parent / "shared" / "data").resolve()))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Small, fast runs: a few steps on a few examples; every test passes these first.
TINY = ["task.max_train_samples=64", "task.max_eval_samples=6", "task.max_new_tokens=8", "trainer.batch_size=4",
        "trainer.max_steps=6", "trainer.eval_every=3", "trainer.save_every=3", "trainer.log_every=1",
        "trainer.eval_batch_size=8",
        "task.metrics=[bleu,nist,rouge_l,cider]"]  # METEOR starts a JVM (8 s): tested in test_metrics_e2e

# metrics.jsonl fields that measure time: they differ between two identical runs
TIMING = {"tokens_per_s", "eval_time_s", "step_s"}


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["PTUNE_DATA_DIR"])
    if not (path / "e2e" / "train.csv").exists():
        pytest.fail(f"test data not found at {path}; set PTUNE_DATA_DIR to the shared data folder")
    return path


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty directory so outputs/ lands in tmp."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@torch.no_grad()
def peft_greedy(model, ids, n, decoder_start=None) -> list:
    """n greedy tokens by full forwards of `model` (no cache), (1, n) as a list: the reference for
    generate(). PEFT's own generate() is not one: under transformers 5.24 its prompt-tuning decode on
    GPT-2 leaves its own forward's argmax after the first token (a PEFT x transformers cache issue)."""
    mask = torch.ones_like(ids)
    out = torch.tensor([[decoder_start]]) if decoder_start is not None else ids
    for _ in range(n):
        if decoder_start is not None:
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=out).logits
        else:
            logits = model(input_ids=out, attention_mask=torch.ones_like(out)).logits
        out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out[:, 1 if decoder_start is not None else ids.shape[1]:].tolist()


def crash_after_checkpoint(monkeypatch, at_step: int):
    """Make the next run "die" (KeyboardInterrupt) right after writing its step-`at_step` checkpoint;
    returns a function that puts the real checkpoint writer back. For resumed == uninterrupted tests."""
    from ptune.train import checkpoint

    real_save = checkpoint.save_checkpoint

    def save_then_crash(root, step, *a, **kw):
        path = real_save(root, step, *a, **kw)
        if step == at_step:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    return lambda: monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
