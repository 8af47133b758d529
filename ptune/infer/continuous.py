"""Continuous batching of greedy decoding: rows of any mix of adapters join and leave one running batch
at token boundaries, on one frozen causal backbone.

    dec = Decoder(methods, stop_ids, pad_id)
    dec.join([Row(adapter=0, ids=[...], limit=64, on_token=f, on_done=g), ...])   # prefilled now
    while dec.rows:
        dec.step()               # one token for every running row; finished rows leave at once

`ptune.infer.mixed.greedy` decodes a batch that starts together and runs until its last row ends; a row
that finishes early keeps feeding pads, and a row that arrives meanwhile waits for the whole batch.
Here the batch is a set of rows, each with its own state kept in one tensor per kind:

    cache    per layer keys/values (rows, kv_heads, T, head_dim): the row's prefix (prefix, p-tuning-v2),
             its soft prompt and tokens as the prefill wrote them, then one column per generated token
    mask     (rows, T): 1 where the row has a key, 0 in the columns it never had
    position (rows, 1): the position of the row's last token, as the row has it alone
    token    (rows,): the token the row feeds next (the one it just emitted)

Join: the new rows are prefilled together (`mixed.mixed_inputs`, the same layout and positions as
`mixed.greedy`), which gives their first token; their caches and masks are then left-padded to the
running batch's width T (or the batch's to theirs) and concatenated along the rows. Leave: the rows
that emitted a stop id, reached their limit or were cancelled are dropped (index_select), and columns
no remaining row uses are cut from the left. A padded column is masked, so it is never read; positions
are explicit (position_ids), and the keys carry the rotary/absolute positions the row wrote them with,
so moving a row's keys to other columns changes nothing it computes: each row's tokens equal the ones
it decodes alone, up to float summation order (tests/test_serve_batching.py checks the text).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ptune.errors import PtuneError
from ptune.infer import mixed
from ptune.methods import kv


@dataclass
class Row:
    """One generation row: its adapter (index into the decoder's methods), prompt ids, token limit, and
    what to call from the decoding thread: on_token(id) per new token, on_done(reason) once at the end
    ("stop": a stop id, "length": the limit, "cancelled": `cancel()` was called)."""

    adapter: int
    ids: list[int]
    limit: int
    on_token: Callable[[int], None] = lambda t: None
    on_done: Callable[[str], None] = lambda reason: None
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False

    def cancel(self) -> None:
        """Leave at the next token boundary (thread-safe: a flag the decoding thread reads)."""
        self.cancelled = True


class Decoder:
    """The running batch (module docstring). Not thread-safe: one thread calls join and step."""

    def __init__(self, methods: list, stop_ids: list[int], pad_id: int):
        backbone = methods[0].backbone
        if backbone.kind != "causal":
            raise PtuneError(f"model {backbone.name} ({backbone.kind}) does not decode continuously; use a causal model")
        self.methods = methods
        self.model = backbone.model
        self.key = kv.cache_kwarg(self.model)
        self.stops = set(stop_ids)
        self.pad_id = pad_id
        self.device = next(self.model.parameters()).device
        self.rows: list[Row] = []
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.mask = self.position = self.token = None

    @torch.no_grad()
    def join(self, rows: list[Row]) -> None:
        """Prefill `rows` together and add them to the running batch; each emits its first token."""
        if not rows:
            return
        from transformers import DynamicCache

        width = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, r in enumerate(rows):  # left padding: every row ends at the last column
            ids[i, width - len(r.ids):] = torch.tensor(r.ids)
            attn[i, width - len(r.ids):] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        adapters = torch.tensor([r.adapter for r in rows], device=self.device)
        layout = mixed.mixed_inputs(self.methods, ids, attn, adapters)
        inputs = dict(layout.inputs, use_cache=True)
        inputs.setdefault(self.key, DynamicCache(config=self.model.config))
        hidden = self.model.base_model(**inputs).last_hidden_state[:, -1]
        layers = [(layer.keys, layer.values) for layer in inputs[self.key].layers]
        mask = inputs["attention_mask"]
        position = layout.token_positions.masked_fill(attn == 0, -1).amax(-1, keepdim=True)
        token = self.model.get_output_embeddings()(hidden).argmax(-1)
        if self.rows:
            t = max(mask.shape[1], self.mask.shape[1])
            layers = [(torch.cat([_left(k0, t, 2), _left(k1, t, 2)]), torch.cat([_left(v0, t, 2), _left(v1, t, 2)]))
                      for (k0, v0), (k1, v1) in zip(self.layers, layers)]
            mask = torch.cat([_left(self.mask, t, 1), _left(mask, t, 1)])
            position = torch.cat([self.position, position])
            token = torch.cat([self.token, token])
        self.rows = self.rows + list(rows)
        self.layers, self.mask, self.position, self.token = layers, mask, position, token
        self._emit(first=len(self.rows) - len(rows))

    @torch.no_grad()
    def step(self) -> None:
        """One token for every running row; the rows that end leave the batch."""
        if not self.rows:
            return
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        self.position = self.position + 1
        cache = kv.dynamic_cache(self.layers, self.model.config)
        inputs = {"input_ids": self.token.unsqueeze(1), "attention_mask": self.mask, "use_cache": True, self.key: cache}
        if self.methods[0].takes_position_ids:
            inputs["position_ids"] = self.position
        hidden = self.model.base_model(**inputs).last_hidden_state[:, -1]
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]
        self.token = self.model.get_output_embeddings()(hidden).argmax(-1)
        self._emit(first=0)

    def _emit(self, first: int) -> None:
        """Hand rows[first:] their new token (the rows before it just joined... or all rows after a step),
        then drop every row that has ended."""
        tokens = self.token.tolist()
        keep = []
        for i, row in enumerate(self.rows):
            reason = "cancelled" if row.cancelled else None
            if i >= first and reason is None:
                row.tokens.append(tokens[i])
                row.on_token(tokens[i])
                if row.cancelled:  # the callback ended it (a stop string)
                    reason = "cancelled"
                elif tokens[i] in self.stops:
                    reason = "stop"
                elif len(row.tokens) >= row.limit:
                    reason = "length"
            if reason is None:
                keep.append(i)
            else:
                row.on_done(reason)
        if len(keep) < len(self.rows):
            self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.layers, self.mask, self.position, self.token = [], None, None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self.mask[index]
        start = int(mask.any(0).long().argmax())  # columns before it belong to no remaining row
        self.mask = mask[:, start:]
        self.layers = [(k[index][:, :, start:], v[index][:, :, start:]) for k, v in self.layers]
        self.position, self.token = self.position[index], self.token[index]

    def cancel_all(self) -> None:
        for row in self.rows:
            row.on_done("cancelled")
        self._keep([])


def _left(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """x zero-padded on the left of `dim` to `width` columns."""
    pad = width - x.shape[dim]
    if not pad:
        return x
    spec = [0, 0] * (x.dim() - 1 - dim) + [pad, 0]
    return F.pad(x, spec)
