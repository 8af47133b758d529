"""A frozen backbone sharded across processes (trainer.shard=fsdp), on PyTorch FSDP2 (`fully_shard`).

Each transformer layer (the repeated blocks: Llama's model.layers, GPT-2's transformer.h, BERT's
encoder.layer, T5's and BART's encoder and decoder blocks) becomes one FSDP unit: every process keeps
1/N of its weights and gathers the whole layer just before its forward (and again for the backward,
which needs the weights for the input gradients), freeing it after. Nothing else changes:

- The trained tensors (prompt, prefix and its MLP, prompt encoder, head) are small and stay whole in
  every process; the loop all-reduces their gradients exactly as unsharded (ptune.train.loop), so a
  sharded run computes the unsharded run's numbers, checkpoints the same tensors and writes the same
  adapter (rank 0, full tensors), loadable without any sharding.
- Embeddings, the LM head (often tied to them) and the final norm stay whole too: the methods read the
  embedding table directly (soft prompts, verbalizers), and a tied matrix cannot sit in two FSDP units.
  For 1B-70B Llama models the layers are 90-99% of the weights; for SmolLM2-135M (a 28M-row tied
  embedding) 79%.
- Evaluation runs on every process in lockstep (the same batches, so the same gathers); rank 0 writes.

Why FSDP2's `fully_shard` directly and not Accelerate's FSDP plugin: the plugin wraps the whole model for
`accelerator.prepare` with a DDP-style gradient reduction of trained weights, while here the backbone
trains nothing and the trainable tensors live outside it (docs/design.md). The engine is the same.
What is left out: fine-tune (its backbone trains: use Accelerate's FSDP plugin and a Trainer), a
quantized backbone sharded (torchao's tensor subclasses do not shard), and sharded loading (each
process still reads the whole checkpoint once before it keeps its share).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ptune.errors import PtuneError
from ptune.quantize import layer_lists, stored_bytes

SHARDS = ("none", "fsdp")


def refuse(method_name: str, trains_backbone: bool, world: int, quantized: bool) -> None:
    """One line for what trainer.shard=fsdp cannot do."""
    if world < 2:
        raise PtuneError("trainer.shard=fsdp splits the backbone across processes, and this is one process: launch "
                         "several (accelerate launch --multi_gpu --num_processes 2 -m ptune train ..., or torchrun) or "
                         "set trainer.shard=none")
    if trains_backbone:
        raise PtuneError(f"trainer.shard=fsdp shards a FROZEN backbone; method={method_name} trains it. Use "
                         "trainer.shard=none (several processes then each hold the whole model)")
    if quantized:
        raise PtuneError("trainer.shard=fsdp with model.quantize: a quantized backbone is not sharded (torchao's "
                         "quantized weights are not FSDP-shardable); choose one of the two")


def shard_backbone(model: nn.Module, world: int, device: torch.device) -> int:
    """Shard every layer of `model` across the `world` processes (FSDP2); returns the number of layers."""
    mesh = init_device_mesh(device.type, (world,))
    layers = [layer for stack in layer_lists(model) for layer in stack]
    if not layers:
        raise PtuneError(f"trainer.shard=fsdp: {type(model).__name__} has no stack of repeated layers to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
        # Each layer is its own root unit (the methods call the backbone in different places: the whole model,
        # its base, its encoder), and FSDP2 keeps a root's gathered weights after forward (for its backward,
        # or for good under no_grad): ask for the reshard, so a process holds one gathered layer at a time.
        layer.set_reshard_after_forward(True)
    return len(layers)


def local_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers this process holds (a shard counts its local part only, a
    quantized weight its packed values and scales)."""
    return sum(stored_bytes(t) for t in [*model.parameters(), *model.buffers()])
