"""trainer.precision=bf16: frozen matmul weights stored in bf16 once (models.store_frozen), which
computes exactly what autocast over fp32 weights computes; trained tensors and optimizer state fp32,
evaluation under the same autocast, and the bf16 run still resumes bit for bit."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import TINY, assert_same_tensors, crash_after_checkpoint, metrics_of
from ptune.cli import compose, main
from ptune.build import build
from ptune.train.job import frozen_dtype


def _runs(root):
    return sorted(p.parent for p in (root / "outputs").rglob("config.yaml"))


@pytest.mark.parametrize("method,model,task", [("prefix", "tiny-llama", "e2e"), ("prompt", "tiny-t5", "e2e"),
                                               ("p-tuning-v2", "tiny-bert", "sst2")])
def test_bf16_run_stores_frozen_weights_in_bf16_and_trains_fp32(in_tmp, data_dir, monkeypatch, method, model, task):
    from ptune import models

    seen = {}
    real = models.store_frozen

    def spy(model_, dtype):
        n = real(model_, dtype)
        seen["linear"] = {m.weight.dtype for m in model_.modules() if isinstance(m, torch.nn.Linear)
                          and m.weight is not model_.get_input_embeddings().weight}
        seen["embedding"] = model_.get_input_embeddings().weight.dtype
        seen["n"] = n
        return n

    monkeypatch.setattr(models, "store_frozen", spy)
    assert main(["train", f"method={method}", f"model={model}", f"task={task}", "trainer.precision=bf16",
                 *[o for o in TINY if task == "e2e" or not o.startswith(("task.max_new", "task.metrics"))]]) == 0
    assert seen["linear"] == {torch.bfloat16} and seen["embedding"] == torch.float32 and seen["n"] > 0
    [run] = _runs(in_tmp)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["eval"] and torch.isfinite(torch.tensor(summary["final_train_loss"]))
    for name, t in load_file(run / "checkpoints/step-6/trainable.safetensors").items():
        assert t.dtype == torch.float32, name
    for name, t in load_file(run / "checkpoints/step-6/optimizer.safetensors").items():
        assert t.dtype == torch.float32, name


def test_frozen_dtype_rules(data_dir):
    cfg = compose(["method=prefix", "model=tiny-llama", "trainer.precision=bf16"])
    assert frozen_dtype(cfg) == torch.bfloat16
    cfg.trainer.frozen_dtype = "fp32"  # the lever off: autocast over fp32 weights
    assert frozen_dtype(cfg) is None
    OmegaConf.set_struct(cfg, False)
    del cfg.trainer["frozen_dtype"]  # a config saved before the key existed resumes as it trained
    assert frozen_dtype(cfg) is None
    assert frozen_dtype(compose(["method=prefix", "model=tiny-llama"])) is None  # fp32 run


@pytest.mark.parametrize("method,model,task", [("prefix", "tiny-llama", "e2e"), ("prompt", "tiny-gpt2", "e2e"),
                                               ("prefix", "tiny-t5", "e2e"), ("p-tuning-v2", "tiny-bart", "sst2"),
                                               ("p-tuning", "tiny-bert", "sst2"), ("fine-tune", "tiny-bart", "e2e")])
def test_stored_bf16_weights_compute_what_autocast_computes(data_dir, method, model, task):
    """Loss and every gradient bit for bit equal to autocast over fp32 weights (fine-tune: top-k layers trained,
    the frozen ones stored in bf16 beside them)."""
    from ptune import heads, models
    from ptune.data import collate

    overrides = [f"model={model}", f"method={method}", f"task={task}", "task.max_train_samples=16"]
    if method == "fine-tune":
        overrides.append("method.trainable=top-k")
    results = []
    for store in (False, True):
        backbone, m, t = build(compose(overrides))
        batch = collate(t.train_examples(backbone.tokenizer, backbone.kind)[:4], backbone.tokenizer.pad_token_id)
        if store:
            assert models.store_frozen(backbone.model, torch.bfloat16) > 0
        backbone.model.eval()
        with torch.autocast("cpu", torch.bfloat16):
            loss, _ = heads.loss(m, batch)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in m.trainable_tensors().values()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert len(grads_a) == len(grads_b) > 0 and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_frozen_dtype_is_checked(in_tmp, capsys):
    assert main(["train", "model=tiny-llama", "trainer.frozen_dtype=fp8"]) == 2
    assert "trainer.frozen_dtype='fp8' is invalid" in capsys.readouterr().err


def test_bf16_resumed_equals_uninterrupted(in_tmp, data_dir, monkeypatch):
    args = ["train", "method=prefix", "model=tiny-llama", "trainer.precision=bf16", *TINY]
    assert main(args) == 0
    [full] = _runs(in_tmp)
    restore = crash_after_checkpoint(monkeypatch, 3)
    assert main(args) == 130
    restore()
    broken = next(p for p in _runs(in_tmp) if p != full)
    assert main(["train", f"resume={broken}"]) == 0
    assert OmegaConf.load(broken / "config.yaml").trainer.frozen_dtype == "auto"
    assert_same_tensors(full, broken, ("adapter/adapter_model.safetensors",))
    assert metrics_of(full) == metrics_of(broken)


def test_attention_auto_is_eager_under_bf16_on_cpu(data_dir):
    from ptune.build import attention

    assert attention(compose(["model=tiny-llama", "trainer.precision=bf16"])) == "eager"
    assert attention(compose(["model=tiny-llama"])) == "sdpa"
    assert attention(compose(["model=tiny-llama", "trainer.precision=bf16", "trainer.attention=sdpa"])) == "sdpa"
    cfg = compose(["model=tiny-llama", "trainer.precision=bf16"])
    OmegaConf.set_struct(cfg, False)
    del cfg.trainer["attention"]  # a run saved before the key: it ran sdpa
    assert attention(cfg) == "sdpa"


@pytest.mark.parametrize("method,model,task", [("prefix", "tiny-llama", "e2e"), ("prefix", "tiny-t5", "e2e"),
                                               ("p-tuning-v2", "tiny-bart", "sst2"), ("prompt", "tiny-gpt2", "e2e"),
                                               ("p-tuning-v2", "tiny-bert", "sst2")])
def test_eager_and_sdpa_attention_agree(data_dir, method, model, task):
    """The same loss and gradients (fp32, to 1e-5) through either attention; encoder prefixes wrap both."""
    from ptune import heads
    from ptune.data import collate

    results = []
    for attn in ("sdpa", "eager"):
        backbone, m, t = build(compose([f"model={model}", f"method={method}", f"task={task}",
                                        "task.max_train_samples=16", f"trainer.attention={attn}"]))
        assert attn in backbone.model.config._attn_implementation
        batch = collate(t.train_examples(backbone.tokenizer, backbone.kind)[:4], backbone.tokenizer.pad_token_id)
        backbone.model.eval()
        loss, _ = heads.loss(m, batch)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in m.trainable_tensors().values()]))
    (la, ga), (lb, gb) = results
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_sweep_over_precision_runs_in_one_process(in_tmp, data_dir):
    """Accelerate's process-wide state is reset between jobs of different precision (a -m sweep)."""
    assert main(["train", "-m", "method=prefix", "model=tiny-llama", "trainer.precision=fp32,bf16", *TINY]) == 0
    summaries = sorted((json.loads(p.read_text()) for p in (in_tmp / "outputs").rglob("summary.json")),
                       key=lambda s: s["precision"])
    assert [s["precision"] for s in summaries] == ["bf16", "fp32"]
