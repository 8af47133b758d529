"""model.quantize: the frozen layers' linear weights quantized with torchao (ptune/quantize.py).

What must hold: every prompt method trains through a quantized backbone (the loss falls, the prompt
gets gradients); only the layers' linear weights are quantized and they take the stored size the
format promises; the numbers stay close to the unquantized model's; a run trained quantized is
evaluated and served quantized (the saved config carries the key); what cannot run is one line.
"""

from pathlib import Path

import pytest
import torch

from conftest import TINY
from ptune import quantize
from ptune.build import build_backbone
from ptune.config import compose
from ptune.errors import PtuneError
from ptune.infer.evaluate import evaluate_run
from ptune.train.job import train

STEPS = ["trainer.max_steps=6", "trainer.eval_every=6", "trainer.save_every=6", "trainer.lr=5e-3"]


def _model(name, how):
    return build_backbone(compose([f"model={name}", f"model.quantize={how}"])).model


@pytest.mark.parametrize("how, ratio", [("int8", 0.30), ("nf4", 0.15)])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-t5"])
def test_only_the_layer_linears_are_quantized_to_their_size(name, how, ratio):
    plain, quant = _model(name, "none"), _model(name, how)
    lin_plain = sum(quantize.stored_bytes(m.weight) for _, m in quantize.layer_linears(plain))
    lin_quant = [m.weight for _, m in quantize.layer_linears(quant)]
    assert lin_quant and all(quantize.is_quantized(w) for w in lin_quant)
    assert sum(quantize.stored_bytes(w) for w in lin_quant) <= ratio * lin_plain  # fp32 -> ~1/4 (int8), ~1/8 (nf4)
    emb = quant.get_input_embeddings().weight
    assert not quantize.is_quantized(emb) and torch.equal(emb, plain.get_input_embeddings().weight)


def test_gpt2_conv1d_becomes_the_same_linear():
    from transformers.pytorch_utils import Conv1D

    model = _model("tiny-gpt2", "none")
    conv = model.transformer.h[0].mlp.c_fc
    assert isinstance(conv, Conv1D)
    x = torch.randn(3, conv.weight.shape[0])
    before = conv(x)
    quantize._conv1d_to_linear(model.transformer.h[0])
    assert isinstance(model.transformer.h[0].mlp.c_fc, torch.nn.Linear)
    assert torch.allclose(model.transformer.h[0].mlp.c_fc(x), before, atol=1e-6)


def test_quantized_outputs_stay_close_to_the_model():
    ids = torch.randint(5, 1000, (2, 12))
    ref = _model("tiny-llama", "none")(input_ids=ids).logits
    for how, tol in (("int8", 0.02), ("nf4", 0.15)):
        out = _model("tiny-llama", how)(input_ids=ids).logits
        assert (out - ref).norm() / ref.norm() < tol, how


@pytest.mark.parametrize("how", ["int8", "nf4"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_the_backward_keeps_no_dequantized_weight_and_gives_its_input_gradient(how, autocast):
    """Between forward and backward a quantized layer keeps its packed weight only, never a dequantized
    copy of it (torchao's int8 linear left to autograd kept one per layer); the input gradient is the one
    of a plain linear over the dequantized weight."""
    model = _model("tiny-llama", how)
    layer = model.model.layers[0].mlp  # gate, up, down: Llama's MLP
    dense = {}
    for n in ("gate_proj", "up_proj", "down_proj"):
        q = getattr(layer, n)
        dense[n] = torch.nn.Linear(q.in_features, q.out_features, bias=False).requires_grad_(False)
        dense[n].weight.copy_(q.weight.dequantize() if how == "int8" else q.weight.get_original_weight())
    x = torch.randn(2, 5, layer.gate_proj.in_features, requires_grad=True)
    big = []

    def pack(t):
        if type(t) is torch.Tensor and t.numel() >= layer.down_proj.in_features * layer.down_proj.out_features:
            big.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16,
                                                                                     enabled=autocast):
        y = layer(x)
    assert big == []  # no (out, in) weight-sized plain tensor waits for the backward
    g = torch.randn_like(y)
    grad, = torch.autograd.grad(y, x, g)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        y_ref = dense["down_proj"](torch.nn.functional.silu(dense["gate_proj"](x)) * dense["up_proj"](x))
    ref, = torch.autograd.grad(y_ref, x, g.to(y_ref.dtype))
    tol = 3e-2 if autocast else 1e-4
    torch.testing.assert_close(grad.float(), ref.float(), atol=tol * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("method", ["prompt", "prefix", "p-tuning", "p-tuning-v2"])
@pytest.mark.parametrize("how", ["int8", "nf4"])
def test_every_prompt_method_trains_through_a_quantized_backbone(tmp_path, data_dir, method, how):
    cfg = compose([f"method={method}", "model=tiny-llama", f"model.quantize={how}", *TINY, *STEPS,
                   f"output_dir={tmp_path}"])
    s = train(cfg)["summary"]
    assert s["quantize"] == how
    assert s["final_train_loss"] < s["first_train_loss"]


def test_a_quantized_run_is_evaluated_quantized(tmp_path, data_dir):
    cfg = compose(["method=prompt", "model=tiny-llama", "model.quantize=int8", *TINY, *STEPS, f"output_dir={tmp_path}"])
    out = train(cfg)
    saved = (Path(out["run_dir"]) / "config.yaml").read_text()
    assert "quantize: int8" in saved
    again = evaluate_run(out["run_dir"], split="dev")
    assert again["metrics"] == pytest.approx(out["summary"]["eval"])


def test_bf16_with_int8_trains(tmp_path, data_dir):
    cfg = compose(["method=prefix", "model=tiny-llama", "model.quantize=int8", "trainer.precision=bf16", *TINY, *STEPS,
                   f"output_dir={tmp_path}"])
    s = train(cfg)["summary"]
    assert s["final_train_loss"] < s["first_train_loss"]


@pytest.mark.parametrize("overrides, says", [
    (["model.quantize=int4"], "CUDA GPU only"),
    (["model.quantize=int8", "method=fine-tune"], "method=fine-tune trains"),
    (["model.quantize=int3"], "model.quantize"),
])
def test_what_cannot_run_is_one_line(tmp_path, data_dir, overrides, says):
    with pytest.raises(PtuneError, match=says) as e:
        train(compose(["model=tiny-llama", *TINY, *overrides, f"output_dir={tmp_path}"]))
    assert "\n" not in str(e.value)
    assert not any(tmp_path.iterdir())  # refused before a run directory is claimed
