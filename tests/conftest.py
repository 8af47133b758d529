"""Test setup: offline, data from ../shared/data, tiny models only (built in-process)."""

import json
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


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def crash_after_search_save(monkeypatch, n: int):
    """Make the next `ptune search` "die" (KeyboardInterrupt) right after its n-th save of
    search_state.json; returns a function that puts the real writer back (resumed == uninterrupted)."""
    from ptune.search import base

    real_save = base.SearchDir.save
    calls = {"n": 0}

    def save_then_crash(self, state, candidates):
        real_save(self, state, candidates)
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(base.SearchDir, "save", save_then_crash)
    return lambda: monkeypatch.setattr(base.SearchDir, "save", real_save)


# -- resumed == uninterrupted: what two runs of one job must share -----------------------------------
# the tensor files of a finished 6-step run (TINY) that a resumed run must reproduce bit for bit
RUN_TENSORS = ("adapter/adapter_model.safetensors", "adapter_best/adapter_model.safetensors",
               "checkpoints/step-6/trainable.safetensors", "checkpoints/step-6/optimizer.safetensors")
SUMMARY_SAME = ("steps", "final_train_loss", "eval", "best", "train_tokens")  # summary.json keys that must agree


def assert_same_tensors(ref, run, names=RUN_TENSORS):
    """Each safetensors file `names` holds the same tensors, bit for bit, in run directories ref and run."""
    from safetensors.torch import load_file

    for name in names:
        a, b = load_file(ref / name), load_file(run / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def metrics_of(run) -> list[dict]:
    """metrics.jsonl of a run directory, without the fields that measure time."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_summary(ref, run):
    s_ref, s_run = (json.loads((r / "summary.json").read_text()) for r in (ref, run))
    for key in SUMMARY_SAME:
        assert s_ref[key] == s_run[key], key


def assert_same_run(ref, run, names=RUN_TENSORS):
    """The uninterrupted run `ref` and `run` agree bit for bit (timings aside): tensors, metrics, summary."""
    assert_same_tensors(ref, run, names)
    assert metrics_of(ref) == metrics_of(run)
    assert_same_summary(ref, run)


# -- the tiny backbones and small batches the method tests share ------------------------------------
def load(name):
    """A tiny backbone, built from conf/model/<name>.yaml (random weights, fixed seed)."""
    from ptune import models
    from ptune.cli import compose

    cfg = compose([f"model={name}"]).model
    return models.load(cfg.name, cfg.kind, cfg.source, tiny=dict(cfg.tiny), tokenizer=cfg.tokenizer)


def pytest_generate_tests(metafunc):
    """A test that takes `backbone` runs once per name in its module's BACKBONES."""
    if "backbone" in metafunc.fixturenames and hasattr(metafunc.module, "BACKBONES"):
        metafunc.parametrize("backbone", metafunc.module.BACKBONES, indirect=True, scope="module")


@pytest.fixture(scope="module")
def backbone(request):
    """The tiny backbone request.param names, built once per test module."""
    return load(request.param)


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


# Where each tiny generating model keeps its blocks and final norm (its decoder's, on T5 and BART),
# written out by hand so that the generic search in fine_tune.find_blocks is checked against an
# independent answer. BART is post-LN: its decoder has no final norm (layernorm_embedding,
# registered after the layers, runs before them).
LAYOUT = {"tiny-gpt2": ("transformer.h", "transformer.ln_f"), "tiny-llama": ("model.layers", "model.norm"),
          "tiny-t5": ("decoder.block", "decoder.final_layer_norm"), "tiny-bart": ("model.decoder.layers", None)}


def expected_names(backbone, trainable, k) -> set[str]:
    """State-dict names fine-tune should train, from LAYOUT (tied head: the embedding's name)."""
    model = backbone.model
    first = {id(p): n for n, p in model.named_parameters()}
    head = {first[id(p)] for p in model.get_output_embeddings().parameters()}
    if trainable == "all":
        return set(first.values())
    if trainable == "head":
        return head
    blocks_path, norm_path = LAYOUT[backbone.name]
    n = len(model.get_submodule(blocks_path))
    tops = tuple(f"{blocks_path}.{i}." for i in range(n - k, n)) + ((norm_path + ".",) if norm_path else ())
    return {name for name in first.values() if name.startswith(tops)} | head


def encoder_count(encoder, H, E):
    """Trainable numbers of P-tuning's prompt encoder alone, written out layer by layer."""
    if encoder == "mlp":  # Linear(H, E) ReLU Linear(E, E) ReLU Linear(E, H)
        return (H * E + E) + (E * E + E) + (E * H + H)
    h = E // 2  # units per direction; each LSTM direction has 4 gates with W_ih, W_hh, b_ih, b_hh
    layer0 = 2 * (4 * h * H + 4 * h * h + 8 * h)
    layer1 = 2 * (4 * h * 2 * h + 4 * h * h + 8 * h)  # input is both directions of layer 0
    return layer0 + layer1 + (E * E + E) + (E * H + H)  # + Linear(E, E) ReLU Linear(E, H)


# -- adapters of several runs on one backbone (test_multi, test_serve) ------------------------------
# name -> overrides: different methods, prompt lengths (2..6), heads and tasks on one backbone
CAUSAL = {
    "lin": ["method=prompt", "method.num_virtual_tokens=3", "task=sst2"],
    "v2": ["method=p-tuning-v2", "method.num_virtual_tokens=2", "task=sst2"],
    "pt": ["method=p-tuning", "method.num_virtual_tokens=2", "task=sst2"],
    "verb_prefix": ["method=prefix", "method.num_virtual_tokens=5", "task=sst2", "task.head=verbalizer"],
    "verb_prompt": ["method=prompt", "method.num_virtual_tokens=4", "task=sst2", "task.head=verbalizer"],
    "gen_prompt": ["method=prompt", "method.num_virtual_tokens=4", "task=e2e", "task.max_new_tokens=8"],
    "gen_prefix": ["method=prefix", "method.num_virtual_tokens=6", "task=e2e", "task.max_new_tokens=6"],
    "hard": ["method=hard-prompt", "task=sst2", "task.head=verbalizer"],  # nothing of its own: no slots
}
MRS = ["name[The Eagle], food[French], area[riverside]", "name[X]", "name[Blue Spice], eatType[pub]"]


def run_config(model: str, overrides: list[str]):
    from ptune.cli import compose

    return compose([f"model={model}", *overrides])


def randomize(method, seed: int) -> None:
    """Adapter tensors of a trained size: N(0, 1) (a fresh head draws N(0, 0.02), which hides mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


def build_pool(model: str, specs: dict):
    """A ptune.infer.pool.Pool of one adapter per spec (random tensors), all on one backbone."""
    from ptune.build import build, build_backbone
    from ptune.infer.pool import Adapter, Pool

    backbone, adapters = None, {}
    for i, (name, overrides) in enumerate(specs.items()):
        cfg = run_config(model, overrides)
        backbone = backbone or build_backbone(cfg)
        _, method, task = build(cfg, backbone)
        randomize(method, i)
        adapters[name] = Adapter(name, method, task)
    return Pool(backbone, adapters)


def make_run(directory, model: str, overrides: list[str], seed: int):
    """A finished run's directory (config.yaml + adapter/) with random adapter tensors."""
    from omegaconf import OmegaConf

    from ptune.adapter import adapter_tensors, save_adapter
    from ptune.build import build

    cfg = run_config(model, overrides)
    _, method, task = build(cfg)
    randomize(method, seed)
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    config = {**method.adapter_config(), "base_model": cfg.model.name, "task": cfg.task.name}
    save_adapter(directory / "adapter", adapter_tensors(method), config)
    return directory


class Marker:
    """A pickle whose loading creates a file: proof that something unpickled it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))
