"""A quantized frozen backbone (model.quantize=int8|int4|nf4), on torchao.

Only the linear layers INSIDE the transformer layers are quantized (attention and MLP projections: in a
Llama 90-99% of the weights); embeddings, the LM head (often tied to the embeddings), norms and
everything a method trains stay as they are. The prompt, prefix or head trains through the quantized
layers: their forward computes with the quantized weights and their backward gives the input gradients
(the weights themselves get none), as in QLoRA (Dettmers et al. 2023), with prompts in place of LoRA.

| key  | torchao                                      | stored per weight            | where          |
|------|----------------------------------------------|------------------------------|----------------|
| int8 | Int8WeightOnlyConfig (per-row scale)          | 1 byte + a scale per row     | CPU and CUDA   |
| nf4  | NF4Tensor, blocks of 64 (QLoRA's NormalFloat4, scales quantized in blocks of 256) | 0.5 byte + ~0.02 | CPU and CUDA |
| int4 | Int4WeightOnlyConfig, groups of 128, tinygemm's tile-packed layout | 0.5 byte + a bf16 scale and zero per group | CUDA, bf16 only |

Why these: torchao is PyTorch's own maintained quantization library and runs on CPU, so every path but
int4 is tested here. bitsandbytes' NF4 is CUDA-only and would be a second library for the same format:
torchao's NF4 is the one torchtune's QLoRA uses, on CPU and GPU alike. torchao 0.18's int4 has no CPU
layout that stores 4 bits (its CPU "int4" keeps one int8 per weight, no smaller than int8), so int4 is
refused on CPU in one line rather than accepted and not delivered; on CPU, nf4 is the 4-bit choice.
Not combined with trainer.shard=fsdp (ptune.train.shard) or with method=fine-tune (quantized weights
do not train).
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from ptune.errors import PtuneError

NF4_BLOCK = 64  # QLoRA's block size; its scales are quantized again in blocks of up to 256 (_scaler_block)
INT4_GROUP = 128


@contextlib.contextmanager
def _quiet_import():
    """torchao logs a warning per optional CUDA extension it cannot load on a CPU machine."""
    names = ("torchao", "torch.utils._pytree")
    levels = [logging.getLogger(n).level for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in zip(names, levels):
            logging.getLogger(n).setLevel(level)


def _torchao():
    try:
        with _quiet_import():
            import torchao.quantization as q
    except ImportError:
        raise PtuneError("model.quantize needs torchao: pip install torchao (scripts/setup.sh installs it)") from None
    return q


def refuse(how: str, method_name: str | None, trains_backbone: bool, precision: str, cuda: bool) -> None:
    """One line for a model.quantize that cannot run here."""
    if how == "none":
        return
    if trains_backbone:
        raise PtuneError(f"model.quantize={how} freezes the backbone in a quantized form, and method={method_name} trains "
                         f"it; use model.quantize=none, or a prompt method (prompt, prefix, p-tuning, p-tuning-v2)")
    if how == "int4" and not cuda:
        raise PtuneError("model.quantize=int4 runs on a CUDA GPU only (torchao has no 4-bit CPU layout); on CPU use "
                         "model.quantize=nf4 (4 bits per weight too) or int8")
    if how == "int4" and precision != "bf16":
        raise PtuneError(f"model.quantize=int4 computes in bf16 (torchao's tinygemm kernel); set trainer.precision=bf16 "
                         f"(it is {precision})")


def layer_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The model's stacks of repeated layers: the outermost ModuleLists whose items hold parameters
    (what model.quantize quantizes and trainer.shard=fsdp shards)."""
    found, inside = [], set()
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(any(True for _ in m.parameters()) for m in module):
            found.append(module)
            inside.add(name)
    return found


def _conv1d_to_linear(layer: nn.Module) -> None:
    """GPT-2's Conv1D (y = x W + b, W stored (in, out)) as the nn.Linear it is, so it quantizes like one."""
    from transformers.pytorch_utils import Conv1D

    for name, child in list(layer.named_children()):
        if isinstance(child, Conv1D):
            linear = nn.Linear(child.weight.shape[0], child.weight.shape[1], device=child.weight.device,
                               dtype=child.weight.dtype)
            linear.weight = nn.Parameter(child.weight.data.t().contiguous(), requires_grad=False)
            linear.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(layer, name, linear)
        else:
            _conv1d_to_linear(child)


def layer_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear modules inside the model's stacks of layers (layer_lists); GPT-2's Conv1D modules
    are made nn.Linear first."""
    for stack in layer_lists(model):
        for layer in stack:
            _conv1d_to_linear(layer)
    return [(f"{i}.{name}", m) for i, layer in enumerate(layer for stack in layer_lists(model) for layer in stack)
            for name, m in layer.named_modules() if isinstance(m, nn.Linear)]


def quantize(model: nn.Module, how: str, device: torch.device | None = None) -> int:
    """Quantize the frozen linear weights of `model`'s layers in place; returns how many weights."""
    if how == "none":
        return 0
    q = _torchao()
    linears = layer_linears(model)
    if not linears:
        raise PtuneError(f"model.quantize={how}: {type(model).__name__} has no linear layers in its transformer layers; "
                         f"use model.quantize=none")
    n = 0
    for _, linear in linears:
        n += linear.weight.numel()
        if device is not None:
            linear.to(device)
        if how == "nf4":
            weight = linear.weight.data
            linear.weight = nn.Parameter(q.to_nf4(weight, NF4_BLOCK, _scaler_block(weight.numel())), requires_grad=False)
        else:
            config = (q.Int8WeightOnlyConfig() if how == "int8" else
                      q.Int4WeightOnlyConfig(group_size=INT4_GROUP, int4_packing_format="tile_packed_to_4d"))
            if how == "int4":
                linear.to(torch.bfloat16)
            q.quantize_(linear, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
            if how == "int8":
                linear.forward = functools.partial(_frozen_quantized_linear, linear)
    return n


class _FrozenQuantizedLinear(torch.autograd.Function):
    """y = x W^T + b through a frozen quantized W whose backward keeps W's packed bytes only.

    Left to autograd, torchao's weight-only int8 linear records its dequantization and keeps the
    dequantized weight (the layer's full width, bf16 under autocast, fp32 otherwise) from the forward
    to the backward of every layer: on SmolLM2 the int8 run's training step peaked 470 MB above bf16's
    (docs/performance.md). Here the forward is torchao's own (the same outputs) and the backward
    dequantizes W for the input gradient and drops it at once; W gets no gradient (frozen). torchao's
    NF4Tensor does this itself; int4 (CUDA, tinygemm) is left to torchao, untested here."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight, ctx.x_dtype = weight, x.dtype  # the frozen parameter: no copy, no version to check
        kind = x.device.type  # the backward matmul in autocast's dtype where the forward ran under it
        ctx.dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        dtype = ctx.dtype or grad.dtype
        w = ctx.weight.dequantize(dtype)  # (out, in), freed on return
        return (grad.to(dtype) @ w).to(ctx.x_dtype), None, None


def _frozen_quantized_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not x.requires_grad:  # evaluation, generation: torchao's linear as it is
        return F.linear(x, linear.weight, linear.bias)
    return _FrozenQuantizedLinear.apply(x, linear.weight, linear.bias)


def _scaler_block(numel: int) -> int:
    """NF4's second-level block (its scales are quantized in blocks of this many): QLoRA's 256 where the
    count of 64-weight blocks allows, else the largest power of two that divides it."""
    if numel % NF4_BLOCK:
        raise PtuneError(f"model.quantize=nf4: a layer weight of {numel} values is not a whole number of "
                         f"{NF4_BLOCK}-value blocks; use model.quantize=int8")
    blocks = numel // NF4_BLOCK
    return next(b for b in (256, 128, 64, 32, 16, 8, 4, 2, 1) if blocks % b == 0)


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds: a quantized weight's packed values and scales, not numel x 4."""
    data = t.data if isinstance(t, nn.Parameter) else t
    if hasattr(data, "to_local"):  # a shard (ptune.train.shard): this process's part
        data = data.to_local()
    if type(data) is torch.Tensor:
        return data.numel() * data.element_size()
    names, _ = data.__tensor_flatten__()
    return sum(stored_bytes(getattr(data, n)) for n in names)


def is_quantized(t: torch.Tensor) -> bool:
    """A torchao quantized weight (a tensor subclass), not a plain tensor."""
    data = t.data if isinstance(t, nn.Parameter) else t
    return type(data) not in (torch.Tensor, nn.Parameter)
