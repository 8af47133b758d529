"""trainer.gradient_checkpointing: the frozen backbone's layers recompute their activations in the backward
pass, for every method (prefix and p-tuning v2 included, which PEFT refuses: issue #869), with the same
losses and trained tensors as without it; what is not built is refused in one line."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_config
from ptune import heads
from ptune.build import build
from ptune.cli import main
from ptune.data import collate

COMMON = ["task.max_train_samples=16", "task.max_eval_samples=4", "trainer.batch_size=4", "trainer.max_steps=3",
          "trainer.eval_every=3", "trainer.save_every=3", "trainer.log_every=1"]
CASES = {
    "llama-prompt": ["model=tiny-llama", "task=e2e", "method=prompt", "method.num_virtual_tokens=4"],
    "llama-prefix": ["model=tiny-llama", "task=e2e", "method=prefix", "method.num_virtual_tokens=4"],
    "llama-p-tuning": ["model=tiny-llama", "task=sst2", "method=p-tuning", "method.num_virtual_tokens=3"],
    "llama-v2": ["model=tiny-llama", "task=sst2", "method=p-tuning-v2", "method.num_virtual_tokens=3"],
    "llama-fine-tune": ["model=tiny-llama", "task=sst2", "method=fine-tune"],
    "gpt2-prefix": ["model=tiny-gpt2", "task=e2e", "method=prefix", "method.num_virtual_tokens=4"],
    "bert-prefix": ["model=tiny-bert", "task=sst2", "method=prefix", "method.num_virtual_tokens=4"],
    "t5-prompt": ["model=tiny-t5", "task=e2e", "method=prompt", "method.num_virtual_tokens=4"],
}


def _train(tmp_path, name, overrides):
    out = tmp_path / name
    assert main(["train", *overrides, *COMMON, f"output_dir={out}"]) == 0
    run = next(out.rglob("config.yaml")).parent
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return losses, load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("case", CASES)
def test_checkpointed_training_equals_plain_training(tmp_path, data_dir, case):
    plain_losses, plain = _train(tmp_path, "plain", CASES[case])
    ckpt_losses, ckpt = _train(tmp_path, "ckpt", [*CASES[case], "trainer.gradient_checkpointing=true"])
    assert len(plain_losses) == 3 and torch.allclose(torch.tensor(ckpt_losses), torch.tensor(plain_losses), atol=1e-5)
    assert plain.keys() == ckpt.keys()
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model, attention", [("tiny-llama", lambda m: m.model.layers[0].self_attn),
                                              ("tiny-gpt2", lambda m: m.transformer.h[0].attn)], ids=["llama", "gpt2"])
def test_prefix_layers_really_recompute_and_keep_the_prefix(data_dir, model, attention):
    """Each layer runs twice per step (forward, then in backward), and the prefix's gradients equal the
    plain ones: transformers' own checkpointing drops the prefix cache (the gradient would be zero)."""
    cfg = run_config(model, ["task=e2e", "method=prefix", "method.num_virtual_tokens=4", "task.max_train_samples=4"])
    grads, calls = [], []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        backbone, method, task = build(cfg)
        if checkpointed:
            method.checkpoint_activations()
        layer = attention(backbone.model)  # inside the checkpointed forward: runs again on recompute
        calls.append(0)
        layer.register_forward_pre_hook(lambda *a: calls.__setitem__(-1, calls[-1] + 1))
        tok = backbone.tokenizer
        batch = collate(task.train_examples(tok, backbone.kind)[:4], tok.pad_token_id)
        backbone.model.train()
        torch.manual_seed(1)
        loss, n = heads.loss(method, batch)
        (loss / n).backward()
        grads.append({k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None})
    assert calls == [1, 2]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        assert grads[0][k].abs().sum() > 0
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5)


def test_prefix_on_an_encoder_decoder_is_refused_in_one_line(tmp_path, data_dir, capsys):
    argv = ["train", "model=tiny-t5", "task=e2e", "method=prefix", *COMMON, "trainer.gradient_checkpointing=true",
            f"output_dir={tmp_path}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gradient_checkpointing=true with method=prefix on an encoder-decoder" in err[0]
    assert not list(tmp_path.iterdir())  # refused before a run directory was claimed


def test_a_non_boolean_is_refused(tmp_path, data_dir, capsys):
    assert main(["train", "model=tiny-llama", "trainer.gradient_checkpointing=sometimes", f"output_dir={tmp_path}"]) == 2
    assert "trainer.gradient_checkpointing='sometimes' is invalid: write true or false" in capsys.readouterr().err


def test_the_key_reaches_the_method(tmp_path, data_dir, monkeypatch):
    """trainer.gradient_checkpointing=true is what switches it on (the equality tests would pass if it were ignored)."""
    from ptune.methods.base import Method

    called = []
    real = Method.checkpoint_activations
    monkeypatch.setattr(Method, "checkpoint_activations", lambda self: called.append(self.name) or real(self))
    _train(tmp_path, "off", CASES["llama-prefix"])
    assert called == []
    _train(tmp_path, "on", [*CASES["llama-prefix"], "trainer.gradient_checkpointing=true"])
    assert called == ["prefix"]
