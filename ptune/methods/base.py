"""What every method is: a module that wraps a frozen backbone and owns the trainable tensors.

A method changes the backbone's forward in one of three ways: nothing (fine-tune), the input
embeddings (prompt, p-tuning), or the attention's past key/values (prefix, p-tuning-v2). It says
which through `model_inputs`, and knows nothing about tasks; heads (`ptune.heads`) turn the
backbone's hidden states into a loss or predictions.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ptune.models import Backbone


class Method(nn.Module):
    """Base class. Subclasses set `name` and implement `model_inputs`, `adapter_tensors`,
    `load_adapter_tensors`; `trainable_tensors` defaults to every parameter with requires_grad."""

    name = "base"
    # Input positions the method prepends to the sequence (prompt tuning); heads skip them.
    n_prepended = 0

    def __init__(self, backbone: Backbone):
        super().__init__()
        # Held outside the module tree (a plain attribute in a list) so that `self.parameters()`,
        # `state_dict()` and the optimizer see only the method's own tensors, never the backbone.
        self._backbone = [backbone]
        self.dims = backbone.dims
        self._takes_position_ids = "position_ids" in inspect.signature(backbone.model.forward).parameters

    @property
    def backbone(self) -> Backbone:
        return self._backbone[0]

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
        if not self._takes_position_ids:
            return None
        pos = attention_mask.long().cumsum(-1) - 1 + n_before
        return pos.masked_fill(attention_mask == 0, 1)

    def attach_head(self, head: nn.Module) -> None:
        """Attach a task head (ptune.heads.LinearHead) as the submodule `head`: it then trains with
        the method (its parameters are the method's), lands in checkpoints as `head.*`, and
        train.py saves it in the adapter beside `adapter_tensors()`. A method whose own choice of
        trained tensors depends on the head (fine-tune's `trainable=head`) overrides this."""
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
