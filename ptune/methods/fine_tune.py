"""Fine-tuning — the baseline of Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation", Table 1 rows "Fine-Tune" (every weight trains) and "FT-top2" (only the top 2 blocks).

The backbone's own weights train; nothing is added. The input is the task's template fed to the
plain model, exactly as for hard-prompt (so this class reuses HardPrompt's forward and generate).

`trainable` chooses which weights:
- `all`:   every backbone parameter ("Fine-Tune").
- `head`:  only the output head (for a causal LM, the LM head).
- `top-k`: the top `k` transformer blocks, the final norm and the head ("FT-top2" with k=2).

Tied head (GPT-2, SmolLM2, Llama with tie_word_embeddings): the LM head *is* the input embedding
matrix. We train the tied matrix as it is, so `head` and `top-k` also change the input
embeddings. This is what the paper's own code does: its finetune-top mode unfreezes
`transformer.wte` (the tied matrix) with `ln_f` and the top blocks. Untying would add a
vocab x hidden matrix the base model does not have and an adapter no HF model could load.

Blocks are found without naming classes: the longest nn.ModuleList under `model.base_model`
(`transformer.h`, `model.layers`); the "final norm" is every module its parent registers after
that list (`ln_f`; `norm` and the parameter-free `rotary_emb`). A family that registers its final
norm before the block list (OPT) would leave it out; such a family is not in conf/model/.

Saved tensors are named as in the backbone's state dict. A tied matrix is saved once, under the
name `named_parameters()` keeps (the input embedding's, as in HF checkpoints): safetensors refuses
two names for one storage. Loading copies in place, so the tie holds afterwards.

Differences from the paper: our trainer (AdamW, one param group) applies trainer.weight_decay to
every tensor, biases and norms included (HF's Trainer, used by the paper, exempts them; our
default decay is 0, where this makes no difference). PEFT has no equivalent method.
Encoder-decoder and masked/encoder backbones are not wired in yet: they raise a clear error.
"""

from __future__ import annotations

import torch
from torch import nn

from ptune.errors import PtuneError
from ptune.methods.hard_prompt import HardPrompt

TRAINABLE = ("all", "head", "top-k")


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList, list[nn.Module]]:
    """(path of the block list in `model`, the list, the modules registered after it = final norm).

    The block list is the longest nn.ModuleList under `model.base_model` (the first one on ties).
    """
    base = model.base_model
    lists = [(name, m) for name, m in base.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise PtuneError(f"method.trainable=top-k found no list of transformer blocks in {type(model).__name__}; "
                         f"use method.trainable=all or method.trainable=head")
    path, blocks = max(lists, key=lambda item: len(item[1]))
    parent_path, _, attr = path.rpartition(".")
    children = list(base.get_submodule(parent_path).named_children())
    after = [m for _, m in children[[name for name, _ in children].index(attr) + 1:]]
    base_path = next(name for name, m in model.named_modules() if m is base)
    return ".".join(p for p in (base_path, path) if p), blocks, after


class FineTune(HardPrompt):
    # HardPrompt gives the plain model's model_inputs and generate (positions from the mask); the
    # two methods differ only in what trains and what is saved.
    name = "fine-tune"

    def __init__(self, backbone, trainable: str = "all", k: int = 2, **_):
        super().__init__(backbone)
        if backbone.dims.is_encoder_decoder or backbone.kind != "causal":
            raise PtuneError(f"method=fine-tune on {backbone.kind} models is not available yet; use a decoder-only "
                             f"(causal) model such as model=smollm2-135m")
        if trainable not in TRAINABLE:
            raise PtuneError(f"method.trainable={trainable!r} is not one of {', '.join(TRAINABLE)}")
        model = backbone.model
        self.trainable, self.k, self.blocks = trainable, k, None
        if trainable == "top-k":
            path, blocks, after = find_blocks(model)
            self.blocks = f"{path} ({len(blocks)} blocks)"
            if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= len(blocks)):
                raise PtuneError(f"method.k={k!r} is invalid: must be an integer from 1 to {len(blocks)} "
                                 f"(the blocks of {backbone.name})")
        head = model.get_output_embeddings()
        if head is None and trainable != "all":
            raise PtuneError(f"{backbone.name} has no output head; use method.trainable=all")
        self.tied = head is not None and head.weight is model.get_input_embeddings().weight

        if trainable == "all":
            chosen = [model]
        elif trainable == "head":
            chosen = [head]
        else:
            chosen = [*blocks[-k:], *after, head]
        ids = {id(p) for m in chosen for p in m.parameters()}
        # named_parameters() names each tensor once (a tied matrix by its first name): those are
        # the names of checkpoints and adapters. The loader froze everything; we freeze again so a
        # backbone reused with another `trainable` keeps no stale requires_grad.
        model.requires_grad_(False)
        self._names = [name for name, p in model.named_parameters() if id(p) in ids]
        for p in self.trainable_tensors().values():
            p.requires_grad_(True)

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        """The backbone parameters that train, by state-dict name, each shared tensor once.

        Looked up by name on each call, so a backbone whose parameters were replaced (moved with
        swapped tensors) still hands the optimizer the live ones.
        """
        params = dict(self.backbone.model.named_parameters())
        return {name: params[name] for name in self._names}

    # -- saving --------------------------------------------------------------------------------
    def _aliases(self) -> set[str]:
        """Second names of shared tensors (lm_head.weight when tied): left out of what is saved."""
        model = self.backbone.model
        every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        every |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
        first = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        return every - first

    def adapter_tensors(self):
        """`all`: the whole state dict (persistent buffers too) minus tie aliases; else the trained tensors."""
        if self.trainable == "all":
            aliases = self._aliases()
            return {k: v.detach() for k, v in self.backbone.model.state_dict().items() if k not in aliases}
        return {k: p.detach() for k, p in self.trainable_tensors().items()}

    def load_adapter_tensors(self, tensors):
        """Copy saved tensors into the backbone in place (a tied matrix stays tied)."""
        model = self.backbone.model
        targets = dict(model.named_parameters(remove_duplicate=False))
        targets.update(model.named_buffers(remove_duplicate=False))
        missing = sorted(set(self.adapter_tensors()) - set(tensors))
        unknown = sorted(set(tensors) - set(targets))
        if missing or unknown:
            what = f"lacks {missing[0]}" if missing else f"has {unknown[0]}, which {self.backbone.name} does not"
            raise PtuneError(f"adapter {what} ({len(missing)} missing, {len(unknown)} unknown); load it with the "
                             f"model and method.trainable/method.k it was trained with")
        for name, value in tensors.items():  # all checked before any is copied: no half-loaded model
            if value.shape != targets[name].shape:
                raise PtuneError(f"adapter tensor {name} has shape {tuple(value.shape)}, this model needs "
                                 f"{tuple(targets[name].shape)}; load it with the model it was trained on")
        with torch.no_grad():
            for name, value in tensors.items():
                targets[name].copy_(value)

    def adapter_config(self):
        return dict(method=self.name, trainable=self.trainable, k=self.k, base_model=self.backbone.name,
                    blocks=self.blocks, tied_head=self.tied,
                    tensors=len(self.adapter_tensors()),
                    layout="backbone state-dict names; a tied head is stored once, under the input embedding's name")
