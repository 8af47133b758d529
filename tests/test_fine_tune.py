"""Level 2 and 4: fine-tuning (all / head / top-k) on tiny decoder-only backbones: which tensors
train and are stored, what the adapter says of itself and that a loaded tied head stays tied (on
the encoder-decoders too), bad values; and its CLI resume. What every method proves on every
backbone (frozen weights, a falling loss, the adapter round trip, padding, greedy and beam):
test_contract.py."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import LAYOUT, TINY, assert_same_run, crash_after_checkpoint, expected_names, load
from ptune.adapter import save_adapter, load_adapter
from ptune import methods
from ptune.cli import main
from ptune.errors import PtuneError

BACKBONES = ["tiny-gpt2", "tiny-llama"]
MODES = [("all", 2), ("head", 2), ("top-k", 1), ("top-k", 2)]


def fine_tune(backbone, trainable="all", k=2):
    return methods.build("fine-tune", backbone, trainable=trainable, k=k)


@pytest.mark.parametrize("trainable, k", MODES)
def test_parameter_counts(backbone, trainable, k):
    model, d = backbone.model, backbone.dims
    m = fine_tune(backbone, trainable, k)
    blocks_path, norm_path = LAYOUT[backbone.name]
    blocks = model.get_submodule(blocks_path)
    count = {
        "all": sum(p.numel() for p in model.parameters()),  # parameters() counts a tied matrix once
        "head": model.config.vocab_size * d.hidden,  # no bias in either head
        "top-k": sum(p.numel() for p in blocks[-k:].parameters())
        + sum(p.numel() for p in model.get_submodule(norm_path).parameters()) + model.config.vocab_size * d.hidden,
    }[trainable]
    trained = m.trainable_tensors()
    assert sum(p.numel() for p in trained.values()) == count
    assert set(trained) == expected_names(backbone, trainable, k)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trained)  # exactly those
    assert "lm_head.weight" not in trained  # tied: stored once, under the embedding's name
    assert set(m.adapter_tensors()) == set(trained)  # no persistent buffers in these models
    assert list(m.parameters()) == []  # the method adds nothing of its own


@pytest.mark.parametrize("trainable, k", [("all", 2), ("top-k", 1)])  # head: a subset of top-k
@pytest.mark.parametrize("name", [*BACKBONES, "tiny-t5", "tiny-bart"])
def test_the_adapter_names_its_selection_and_a_loaded_head_stays_tied(name, trainable, k, tmp_path):
    bb = load(name)
    m = fine_tune(bb, trainable, k)
    save_adapter(tmp_path / name, m.adapter_tensors(), m.adapter_config())
    config, tensors = load_adapter(tmp_path / name)
    fresh = load(name)
    fine_tune(fresh, trainable, k).load_adapter_tensors(tensors)
    model = fresh.model
    if bb.kind == "causal":
        assert (config["trainable"], config["k"], config["base_model"], config["tied_head"]) == (trainable, k, name, True)
        assert set(tensors) == set(m.trainable_tensors())
        assert fresh.model.get_output_embeddings().weight is fresh.model.get_input_embeddings().weight  # still tied
    else:  # an adapter of trainable=all holds BART's final_logits_bias too (test_seq2seq's counts)
        assert (config["trainable"], config["k"], config["tied_head"]) == (trainable, k, True)
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
        assert model.get_encoder().embed_tokens.weight is model.get_input_embeddings().weight


def test_bad_values_and_adapters_fail_clearly(backbone):
    from dataclasses import replace

    n = len(backbone.model.get_submodule(LAYOUT[backbone.name][0]))
    for kw, words in [(dict(trainable="bias"), "method.trainable='bias' is not one of all, head, top-k"),
                      (dict(trainable="top-k", k=0), "method.k=0 is invalid"),
                      (dict(trainable="top-k", k=n + 1), f"from 1 to {n}")]:
        with pytest.raises(PtuneError, match=words):
            fine_tune(backbone, **kw)
    with pytest.raises(PtuneError, match="does not know model.kind=vision"):
        fine_tune(replace(backbone, kind="vision"))
    m = fine_tune(backbone, "top-k", 1)
    with pytest.raises(PtuneError, match="adapter lacks"):
        m.load_adapter_tensors(fine_tune(backbone, "head").adapter_tensors())
    with pytest.raises(PtuneError, match="does not"):
        m.load_adapter_tensors({**m.adapter_tensors(), "nope.weight": torch.zeros(1)})
    good = {k: v.clone() for k, v in m.adapter_tensors().items()}
    bad = {k: torch.ones_like(v) for k, v in good.items()}
    bad[LAYOUT[backbone.name][1] + ".weight"] = torch.zeros(3)
    with pytest.raises(PtuneError, match="has shape"):
        m.load_adapter_tensors(bad)
    assert all(torch.equal(v, good[k]) for k, v in m.adapter_tensors().items())  # nothing half-loaded


def test_cli_resumed_equals_uninterrupted(in_tmp, data_dir, monkeypatch):
    """FT-top1 on tiny-llama: a run killed after its step-2 checkpoint and resumed equals an unbroken one."""
    # Later overrides win: TINY, shortened to keep the three runs fast (generation is most of their time,
    # so one evaluation per run, at the end; the trainer's resume of evaluations is test_cli's concern).
    short = ["trainer.max_steps=4", "trainer.eval_every=4", "trainer.save_every=2", "task.max_eval_samples=2",
             "task.max_new_tokens=4", "task.metrics=[bleu]"]
    args = ["train", "method=fine-tune", "method.trainable=top-k", "method.k=1", "model=tiny-llama", *TINY, *short]
    assert main(args) == 0
    [full] = sorted(p for p in (in_tmp / "outputs").glob("*/*") if p.is_dir())
    restore = crash_after_checkpoint(monkeypatch, 2)
    assert main(args) == 130
    restore()
    [broken] = [p for p in (in_tmp / "outputs").glob("*/*") if p.is_dir() and p != full]
    assert main(["train", f"resume={broken}"]) == 0

    names = expected_names(load("tiny-llama"), "top-k", 1)
    files = ("adapter/adapter_model.safetensors", "adapter_best/adapter_model.safetensors",
             "checkpoints/step-4/trainable.safetensors", "checkpoints/step-4/optimizer.safetensors")
    assert_same_run(full, broken, files)  # tensors, metrics, summary
    for name in files:
        if "optimizer" not in name:
            assert set(load_file(full / name)) == names, name
    assert json.loads((full / "adapter/adapter_config.json").read_text())["trainable"] == "top-k"
