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
- The processes load one after another (ptune.train.job._build_sharded), and on CPU a sharded run fixes
  glibc's mmap threshold (ptune.train.loop.fix_mmap_threshold) so the gathered layers' memory goes back to
  the OS when freed; both measured in docs/performance.md.

Why FSDP2's `fully_shard` directly and not Accelerate's FSDP plugin: the plugin wraps the whole model for
`accelerator.prepare` with a DDP-style gradient reduction of trained weights, while here the backbone
trains nothing and the trainable tensors live outside it (docs/design.md). The engine is the same.
What is left out: fine-tune (its backbone trains: use Accelerate's FSDP plugin and a Trainer), a
quantized backbone sharded (torchao's tensor subclasses do not shard), and sharded reading of the
checkpoint: each process still reads the whole checkpoint once, in turn (ptune.train.job._build_sharded),
so one host holds one whole model plus the others' shares at a time, never N whole models, and a device
never holds more than its share plus one gathered layer.
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


def device_mesh(world: int, device: torch.device):
    """The 1-D mesh of all processes (created by every process together, before any of them shards)."""
    return init_device_mesh(device.type, (world,))


def shard_backbone(model: nn.Module, mesh, device: torch.device) -> int:
    """Shard every layer of `model` (on the host or already on `device`) across the mesh (FSDP2) and move
    the rest, which stays whole, to `device`; returns the number of layers. A layer reaches the device as its
    share only: fully_shard moves the layer, splits it and keeps this process's part, one layer at a time."""
    layers = [layer for stack in layer_lists(model) for layer in stack]
    if not layers:
        raise PtuneError(f"trainer.shard=fsdp: {type(model).__name__} has no stack of repeated layers to shard")
    inside = {id(t) for layer in layers for t in (*layer.parameters(), *layer.buffers())}
    with torch.no_grad():
        for module in model.modules():  # what stays whole: in place, so a tied weight stays one tensor
            for p in module._parameters.values():
                if p is not None and id(p) not in inside and p.device != device:
                    p.data = p.data.to(device)
            for name, b in module._buffers.items():
                if b is not None and id(b) not in inside and b.device != device:
                    module._buffers[name] = b.to(device)
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
