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


# -- the tiny backbones and small batches the method tests share ------------------------------------
def load(name):
    """A tiny backbone, built from conf/model/<name>.yaml (random weights, fixed seed)."""
    from ptune import models
    from ptune.cli import compose

    cfg = compose([f"model={name}"]).model
    return models.load(cfg.name, cfg.kind, cfg.source, tiny=dict(cfg.tiny), tokenizer=cfg.tokenizer)


def sharpened(name):
    """A tiny backbone with its matrices redrawn ~ N(0, 0.3). BART and BERT initialise N(0, 0.02),
    which leaves their random logits flat: whatever the input, greedy repeats one token (a wrong
    decoding loop would pass unnoticed) and the loss has a floor 0.006 nats (BART) and 0.008
    (BERT) below its start, measured for prompts at lr 1e-2..3e-1. T5's own scaled init (0.125 and
    up) decodes varied tokens only at this scale too."""
    bb = load(name)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in bb.model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return bb


SENTENCES = ["a gorgeous , witty , seductive movie .", "dull", "the plot is nothing but boilerplate", "a triumph"]


def class_batch(tok, texts=SENTENCES, labels=(1, 0, 0, 1), side="right"):
    """Sentences as a classification batch (layout "class"), padded on `side`."""
    from ptune.data import Example, collate

    return collate([Example(tok(t).input_ids, [y], "class") for t, y in zip(texts, labels)], tok.pad_token_id, side)


def best_of_two_step_beam(next_logprobs, k: int) -> list[int]:
    """What width-k beam search over two new tokens must return, found by hand: the best two-token
    continuation of the k best first tokens (beam search keeps exactly those after step one).
    next_logprobs(prefix) -> (vocab,) log-probs of the token after the new tokens `prefix`.
    (Beam search need not beat greedy: greedy's prefix can fall out of the beam.)"""
    first = next_logprobs([])
    paths = []
    for t in first.topk(k).indices.tolist():
        second = next_logprobs([t])
        paths.append(((first[t] + second.max()).item(), [t, second.argmax().item()]))
    return max(paths)[1]


def encoder_count(encoder, H, E):
    """Trainable numbers of P-tuning's prompt encoder alone, written out layer by layer."""
    if encoder == "mlp":  # Linear(H, E) ReLU Linear(E, E) ReLU Linear(E, H)
        return (H * E + E) + (E * E + E) + (E * H + H)
    h = E // 2  # units per direction; each LSTM direction has 4 gates with W_ih, W_hh, b_ih, b_hh
    layer0 = 2 * (4 * h * H + 4 * h * h + 8 * h)
    layer1 = 2 * (4 * h * 2 * h + 4 * h * h + 8 * h)  # input is both directions of layer 0
    return layer0 + layer1 + (E * E + E) + (E * H + H)  # + Linear(E, E) ReLU Linear(E, H)
