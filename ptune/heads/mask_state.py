"""Heads with tensors of their own that read one vector at the template's {mask}: what the soft
verbalizer (WARP, soft_verbalizer.py) and the prototypical verbalizer (ProtoVerb,
proto_verbalizer.py) share.

The vector is the state at the position that predicts the mask's word, per backbone kind (the
position the word verbalizer reads, verbalizer.py):

- causal (GPT-2, Llama): the last token before {mask} (text after it is dropped, as for the verbalizer);
- masked (BERT) and encoder (MiniLM, no LM head): the mask token itself;
- seq2seq (T5, BART): the decoder's last start token (its start token, BART's <s>, T5's sentinel),
  the encoder reading the template with the mask slot as the verbalizer writes it.

Two spaces (`space`, declared by each head):
- "hidden": the backbone's last hidden state (the decoder's, for seq2seq), (hidden,);
- "output": what the LM's output embedding reads, the space its word vectors live in: the last
  hidden state for causal models, after BERT's MLM transform (dense, GELU, LayerNorm), after T5's
  d_model**-0.5 rescaling. Read generically with a forward pre-hook on `get_output_embeddings()`
  (masked and seq2seq: the LM's own forward, so each family's last steps stay its own code).

Rows are rebuilt per example from its real tokens and right-padded (as `SlotHead` does), so a
batch's padding side changes nothing. Under p-tuning, {soft} slots travel as `soft_mask`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ptune.heads.verbalizer import SlotHead, takes_soft_mask


@contextmanager
def capture_input(module):
    """Collect the first positional input of every call of `module` (a forward pre-hook)."""
    got: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _, args: got.append(args[0]))
    try:
        yield got
    finally:
        handle.remove()


class MaskStateHead(SlotHead):
    """Base of heads scored from the state at the mask (module docstring). Subclasses set `space`
    and give `from_parts(states, words)` -> (batch, n_classes)."""

    reads_lm_head = False  # tensors of its own: under fine-tune it is the task head (methods/fine_tune.py)
    space = "hidden"
    # `manual`, where a subclass sets it: a VerbalizerHead whose word scores it combines (ProtoVerb's
    # task.proto_combine); read with getattr (an nn.Module attribute, so no class-level default)

    def query(self, ids: list[int], soft: list[bool], pos: int) -> tuple[list[int], list[bool], list[int] | None, int]:
        """(input row, its soft flags, decoder row or None, position to read) for one example with
        {mask} at `pos` of its real tokens `ids`."""
        if self.kind == "causal":
            return ids[:pos], soft[:pos], None, pos - 1
        if self.kind == "seq2seq":
            enc = ids[:pos] + self.enc_slot + ids[pos + 1:]
            return enc, soft[:pos] + [False] * len(self.enc_slot) + soft[pos + 1:], list(self.dec_prefix), \
                len(self.dec_prefix) - 1
        slot = [self.mask_id] if self.mask_id is not None else ids[pos:pos + 1]
        return ids[:pos] + slot + ids[pos + 1:], soft, None, pos

    def states(self, method, batch) -> torch.Tensor:
        """(batch, dim) float32: the state at each example's mask, in this head's space."""
        ids, attn, pos = batch["input_ids"], batch["attention_mask"], batch["mask_pos"]
        soft = batch.get("soft_mask")
        queries = []
        for r in range(ids.shape[0]):
            keep = attn[r].bool()
            row = ids[r][keep].tolist()
            queries.append(self.query(row, soft[r][keep].tolist() if soft is not None else [False] * len(row),
                                      int(pos[r])))
        return self._states(method, queries)

    def _states(self, method, queries) -> torch.Tensor:
        device = next(method.backbone.model.parameters()).device
        rows = [q[0] for q in queries]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        soft = torch.zeros_like(ids, dtype=torch.bool)
        for i, (r, s, _, _) in enumerate(queries):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
            soft[i, :len(s)] = torch.tensor(s, dtype=torch.bool)
        ids, mask, soft = ids.to(device), mask.to(device), soft.to(device)
        extra = {"soft_mask": soft} if takes_soft_mask(method) and soft.any() else {}
        inputs = {**method.model_inputs(ids, mask, **extra), "use_cache": False}
        model = method.backbone.model
        read = torch.tensor([q[3] for q in queries], device=device)
        if self.kind == "seq2seq":
            dec = torch.tensor([q[2] for q in queries], device=device)  # one decoder prefix for every row
            with capture_input(model.get_output_embeddings()) as got:
                out = model(**inputs, decoder_input_ids=dec, output_hidden_states=True)
            states = got[0] if self.space == "output" else out.decoder_hidden_states[-1]
        elif self.kind == "masked" and self.space == "output":
            with capture_input(model.get_output_embeddings()) as got:
                model(**inputs)
            states = got[0][:, method.n_prepended:]
        else:  # causal: the output embedding reads the last hidden state itself; encoder: no LM head
            states = model.base_model(**inputs).last_hidden_state[:, method.n_prepended:]
        return states[torch.arange(len(queries), device=device), read].float()

    # -- for callers that run the forward themselves (mixed-adapter batches, ptune.infer.pool) --
    def mask_query(self, ids: list[int], mask_pos: int) -> tuple[list[int], int]:
        """(token row, position to read) for one example without soft slots (causal, masked, encoder)."""
        row, _, _, read = self.query(ids, [False] * len(ids), mask_pos)
        return row, read

    def scores(self, method, batch) -> torch.Tensor:
        manual = getattr(self, "manual", None)
        words = manual.scores(method, batch) if manual is not None else None
        return self.from_parts(self.states(method, batch), words)

    def from_parts(self, states: torch.Tensor, words: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError
