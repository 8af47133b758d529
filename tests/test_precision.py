"""trainer.precision=bf16 on a frozen backbone: frozen weights stored in bf16 once (the lever of
models.store_frozen), trained tensors and optimizer state fp32, evaluation under the same autocast,
and the bf16 run still resumes bit for bit."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import TINY, TIMING
from ptune import checkpoint
from ptune.cli import compose, main
from ptune.train import build, frozen_dtype


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
        seen["dtypes"] = {p.dtype for p in model_.parameters()}
        seen["n"] = n
        return n

    monkeypatch.setattr(models, "store_frozen", spy)
    assert main(["train", f"method={method}", f"model={model}", f"task={task}", "trainer.precision=bf16",
                 *[o for o in TINY if task == "e2e" or not o.startswith(("task.max_new", "task.metrics"))]]) == 0
    assert seen["dtypes"] == {torch.bfloat16} and seen["n"] > 0  # the whole backbone, once
    [run] = _runs(in_tmp)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["eval"] and torch.isfinite(torch.tensor(summary["final_train_loss"]))
    for name, t in load_file(run / "checkpoints/step-6/trainable.safetensors").items():
        assert t.dtype == torch.float32, name
    for name, t in load_file(run / "checkpoints/step-6/optimizer.safetensors").items():
        assert t.dtype == torch.float32, name


def test_frozen_dtype_rules(data_dir):
    cfg = compose(["method=prefix", "model=tiny-llama", "trainer.precision=bf16"])
    backbone, _, _ = build(cfg)
    assert frozen_dtype(cfg, backbone.model) == torch.bfloat16
    cfg.trainer.frozen_dtype = "fp32"  # the lever off: autocast over fp32 weights
    assert frozen_dtype(cfg, backbone.model) is None
    OmegaConf.set_struct(cfg, False)
    del cfg.trainer["frozen_dtype"]  # a config saved before the key existed resumes as it trained
    cfg.trainer.precision = "bf16"
    assert frozen_dtype(cfg, backbone.model) is None
    assert frozen_dtype(compose(["method=prefix", "model=tiny-llama"]), backbone.model) is None  # fp32 run
    # fine-tune trains backbone layers: bf16 and fp32 layer norms would meet in one stream -> fp32
    cfg = compose(["method=fine-tune", "method.trainable=top-k", "model=tiny-bart", "trainer.precision=bf16"])
    backbone, _, _ = build(cfg)
    assert frozen_dtype(cfg, backbone.model) is None


def test_frozen_dtype_is_checked(in_tmp, capsys):
    assert main(["train", "model=tiny-llama", "trainer.frozen_dtype=fp8"]) == 2
    assert "trainer.frozen_dtype='fp8' is invalid" in capsys.readouterr().err


def test_bf16_resumed_equals_uninterrupted(in_tmp, data_dir, monkeypatch):
    args = ["train", "method=prefix", "model=tiny-llama", "trainer.precision=bf16", *TINY]
    assert main(args) == 0
    [full] = _runs(in_tmp)
    real_save = checkpoint.save_checkpoint

    def save_then_crash(root, step, *a, **kw):
        path = real_save(root, step, *a, **kw)
        if step == 3:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    assert main(args) == 130
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    broken = next(p for p in _runs(in_tmp) if p != full)
    assert main(["train", f"resume={broken}"]) == 0
    assert OmegaConf.load(broken / "config.yaml").trainer.frozen_dtype == "auto"
    a, b = (load_file(r / "adapter/adapter_model.safetensors") for r in (full, broken))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def metrics(run):
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert metrics(full) == metrics(broken)
