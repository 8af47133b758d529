"""What every method is: a module that wraps a frozen backbone and owns the trainable tensors.

A method changes the backbone's forward in one of four ways, and declares which in `acts_on`:

    "input"    p soft embeddings before the tokens (prompt, p-tuning)         soft_prompt()
    "kv"       p keys/values in front of every attention (prefix, p-tuning-v2) prefix_rows(stack)
    "weights"  the backbone's own weights train (fine-tune)
    "none"     nothing; the task's template is the method (hard-prompt)

`num_virtual_tokens` (the config key of the same name; the papers' p, and `p` in shape comments)
is how many virtual positions it adds; `n_prepended` is another thing, the positions it puts in
front of the input sequence itself (p for prompt tuning, 0 for prefixes, which sit in the keys
and values, and for p-tuning with {soft} slots inside the template); `trains` whether it trains
anything, `peft_type` PEFT's name for the same method. Code outside ptune/methods/ reads these
declarations and the public accessors; it never asks a method's name (mixed-adapter batches,
export and the trainer's context check all work from them). A method knows nothing about tasks;
heads (ptune/heads/) turn the backbone's hidden states into a loss or predictions.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ptune.methods import kv
from ptune.models import Backbone


class Method(nn.Module):
    """Base class. Subclasses set `name` and implement `model_inputs`, `adapter_tensors`,
    `load_adapter_tensors`; `trainable_tensors` defaults to every parameter with requires_grad."""

    name = "base"  # the registry key (conf/method/<name>.yaml); methods.build sets it
    acts_on = "none"  # "input" | "kv" | "weights" | "none" (module docstring)
    trains = True  # False: nothing to train (hard-prompt); a linear head on it would be a linear probe
    # True: the backbone's own weights train (fine-tune), so it cannot be quantized or sharded as frozen.
    trains_backbone = False
    peft_type: str | None = None  # PEFT's PeftType of the same method, where PEFT has one (ptune export)
    # Virtual positions the method adds (the papers' p): soft tokens, or keys/values per attention.
    num_virtual_tokens = 0
    # Of those, the positions it prepends to the input sequence (heads skip them); 0 for prefixes.
    n_prepended = 0

    def __init__(self, backbone: Backbone):
        super().__init__()
        # Held outside the module tree (a plain attribute in a list) so that `self.parameters()`,
        # `state_dict()` and the optimizer see only the method's own tensors, never the backbone.
        self._backbone = [backbone]
        self.dims = backbone.dims
        self.takes_position_ids = "position_ids" in inspect.signature(backbone.model.forward).parameters

    @property
    def backbone(self) -> Backbone:
        return self._backbone[0]

    # -- what serving and export read ----------------------------------------------------------
    def soft_prompt(self) -> torch.Tensor:
        """(p, hidden) float32: the soft embeddings an `acts_on == "input"` method puts before the tokens."""
        raise TypeError(f"method {self.name} acts on {self.acts_on!r}, it has no soft prompt")

    def prefix_rows(self, stack: str) -> torch.Tensor:
        """(p, n_layers * 2 * kv_heads * head_dim): the collapsed keys/values an `acts_on == "kv"`
        method puts in front of attention stack `stack` (kv.py's flat layout)."""
        raise TypeError(f"method {self.name} acts on {self.acts_on!r}, it has no prefix")

    # -- activation checkpointing (trainer.gradient_checkpointing) ------------------------------
    checkpointed = False  # the backbone recomputes its layers' activations in the backward pass

    def checkpoint_activations(self) -> None:
        """Checkpoint the backbone's layers: their activations are recomputed in the backward pass instead
        of kept (less memory, one more forward of time). The same numbers: recomputation repeats the forward."""
        kv.checkpoint_activations(self.backbone.model)
        self.checkpointed = True

    # -- forward -------------------------------------------------------------------------------
    def model_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """kwargs for the backbone's forward. input_ids, attention_mask: (batch, seq)."""
        raise NotImplementedError

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **gen_kwargs) -> torch.Tensor:
        """New tokens only, (batch * num_return_sequences, new_len)."""
        raise NotImplementedError

    def _position_ids(self, attention_mask: torch.Tensor, n_before: int) -> torch.Tensor | None:
        """Positions that ignore padding, so left- and right-padded rows get the same answer.

        n_before virtual positions (a prefix in the cache) come first; real tokens count on
        from there, as they do in the papers' code and in PEFT. Pads get position 1 (never read).
        """
        if not self.takes_position_ids:
            return None
        pos = attention_mask.long().cumsum(-1) - 1 + n_before
        return pos.masked_fill(attention_mask == 0, 1)

    def attach_head(self, head: nn.Module) -> None:
        """Attach a task head (ptune/heads/: a LinearHead, a verbalizer) as the submodule `head`: it
        then trains with the method (its parameters are the method's), lands in checkpoints as
        `head.*`, and ptune/train/job.py saves it in the adapter beside `adapter_tensors()`. A method
        whose own choice of trained tensors depends on the head (fine-tune's `trainable=head`)
        overrides this."""
        self.head = head

    # -- what is saved -------------------------------------------------------------------------
    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        """Everything the optimizer updates (training state, incl. reparameterization MLPs)."""
        return {k: p for k, p in self.named_parameters() if p.requires_grad}

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """Only what inference needs (e.g. the collapsed prefix, not its MLP)."""
        raise NotImplementedError

    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def adapter_config(self) -> dict:
        """JSON-able description written to adapter_config.json."""
        raise NotImplementedError


def real_tokens_first(attention_mask: torch.Tensor, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Reorder each row so its real positions come first, in order (left padding -> right padding).

    attention_mask and every tensor in rows: (batch, seq), reordered alike; returns (mask, *rows).
    For an encoder-decoder's encoder input. Encoders whose positions are a fixed arange (BART's
    learned absolute positions; BartEncoder takes no position_ids) number a left-padded row's
    real tokens from its padding length, so its logits change with the batch (measured on
    tiny-bart: 1.6e-2). With real tokens first, every row's tokens sit at the positions they have alone.
    The encoder attends both ways and nothing reads its positions back (the decoder's
    cross-attention is invariant to the order of the keys), so the reordering changes nothing
    else; for relative-position encoders (T5) it is harmless.
    """
    order = (attention_mask == 0).long().argsort(dim=1, stable=True)  # (batch, seq): real positions first
    return tuple(t.gather(1, order) for t in (attention_mask, *rows))
