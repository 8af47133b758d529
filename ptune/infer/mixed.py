"""One forward pass for rows that belong to different adapters on one frozen backbone.

Every row r of a batch names an adapter a(r) (an index into a list of loaded prompt-style methods
that share one `Backbone`). What each kind of adapter puts in front of the row's tokens, as the
method declares it (`Method.acts_on`, ptune/methods/base.py):

    "input"  (prompt, p-tuning)         p_a soft embeddings before the tokens, `soft_prompt()`
    "kv"     (prefix, p-tuning-v2)      p_a keys/values per layer in front of the attention, `prefix_rows()`
    "none"   (hard-prompt)              nothing (its words are in the task's template)

Layout: each row is packed on its own, its soft prompt (if any) right before its own real tokens,
and rows are padded to the widest such concatenation, W = max_r (q_r + n_r) (q_r: the row's soft
prompt length, 0 for prefix and hard-prompt rows; n_r: its real tokens). Causal backbones pad on
the left, so every row's last token is the last column (what greedy decoding continues from);
masked/encoder backbones pad on the right, so every row starts at column 0 as it does alone:

    causal   cache slots (Pk)            row (W)
             [ 0 0 0 | k_b k_b k_b ]     [ pad pad | P_a P_a P_a | x1 x2 x3 ]
    encoder                              [ P_a P_a P_a | [CLS] x1 x2 | pad pad ]

Prefix keys/values stay in one cache block before the rows, as wide as the batch's longest
prefix, Pk: a row's own prefix sits at the right end of the block and every slot it does not use
is masked (a prompt or hard-prompt row masks the whole block). A prefix row adds no width to W.
Positions are the ones the row gets alone (`Method._position_ids` and Prompt.model_inputs):
prompt slots 0..q_r-1, real tokens numbered from the row's own p_a (prompt or prefix length),
skipping pads; pads get position 1 and are masked, never read. Prefix keys/values carry no
position (they are stored as the attention reads them, as in kv.py). So each row attends to
exactly the keys it attends to alone, with the same positions, and its outputs equal the
single-adapter ones up to float summation order (tests/test_multi.py: logits within 1e-5,
generated text equal). Fully masked queries (a causal row's left pads) are the slots nobody
reads; sdpa returns zeros for them (torch's safe softmax) and eager attention a finite average,
so they never reach a real row.

Callers pass token rows padded on either side (`input_ids`, `attention_mask`, (batch, S)); the
hidden states and logits come back in the callers' columns (`token_states`, `token_logits`:
(batch, S, ...), gathered from the layout; a pad column holds no meaningful state).

Backbones: causal (GPT-2, Llama) and masked/encoder (BERT, MiniLM). Encoder-decoders take their
prefixes through the encoder's attention function and the decoder cache (kv.py); mixing those is
not built: `check_kind` refuses, and `ptune.infer.pool.Pool` runs seq2seq adapters one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ptune.errors import PtuneError
from ptune.heads.mask_state import capture_input
from ptune.methods import kv

MIXED_KINDS = ("causal", "masked", "encoder")
SIDES = ("input", "kv", "none")  # what a method may act on to share a backbone (Method.acts_on)


def check_kind(backbone) -> None:
    if backbone.kind not in MIXED_KINDS:
        raise PtuneError(f"mixed-adapter batches support causal and encoder models; model={backbone.name} is "
                         f"{backbone.kind} (its adapters run one at a time)")


def side_of(method) -> str:
    """'input', 'kv' or 'none': where the method's tensors enter the backbone (Method.acts_on)."""
    if method.acts_on not in SIDES:
        raise PtuneError(f"method={method.name} cannot share a frozen backbone with other adapters (it changes the "
                         f"backbone's weights); serve prompt, p-tuning, prefix, p-tuning-v2 or hard-prompt runs")
    return method.acts_on


@dataclass
class Mixed:
    """Backbone kwargs for a mixed batch and where the callers' token columns went.

    inputs: inputs_embeds (batch, W, hidden), attention_mask (batch, Pk + W), position_ids
    (batch, W) where the model takes them, the prefix cache when Pk > 0 (W, Pk: module docstring).
    columns: (batch, S) long, the layout column of every input column (hidden states of the
    layout, gathered at `columns`, are the tokens'); a pad column points at column 0.
    token_positions: (batch, S), the position of every input column (pads 1).
    """

    inputs: dict
    columns: torch.Tensor
    token_positions: torch.Tensor

    def tokens(self, states: torch.Tensor) -> torch.Tensor:
        """(batch, W, ...) states of the layout -> (batch, S, ...) in the callers' columns."""
        return states[torch.arange(states.shape[0], device=states.device).unsqueeze(1), self.columns]


@torch.no_grad()
def mixed_inputs(methods: list, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 adapter_ids: torch.Tensor) -> Mixed:
    """Build the mixed batch. methods: loaded methods on one backbone; input_ids, attention_mask:
    (batch, S), padded on either side; adapter_ids: (batch,) long, row r belongs to
    methods[adapter_ids[r]]."""
    backbone = methods[0].backbone
    model = backbone.model
    device = input_ids.device
    batch = input_ids.shape[0]
    sides = [side_of(m) for m in methods]
    used = sorted(set(adapter_ids.tolist()))
    p_of = torch.tensor([m.num_virtual_tokens for m in methods], device=device)
    on_input = torch.tensor([s == "input" for s in sides], device=device)
    n_before = p_of[adapter_ids]  # (batch,): each row's own prompt or prefix length (its first token's position)
    q = torch.where(on_input[adapter_ids], n_before, 0)  # (batch,): soft prompt slots in the row itself
    real = attention_mask != 0  # (batch, S)
    n_real = real.sum(-1)  # (batch,)
    width = int((q + n_real).max())  # W
    pk = max([int(p_of[a]) for a in used if sides[a] == "kv"], default=0)

    # where each row starts: causal rows end at the last column (left padding), encoder rows start at 0
    start = width - q - n_real if backbone.kind == "causal" else torch.zeros_like(q)  # (batch,)
    rank = real.long().cumsum(-1) - 1  # (batch, S): index among the row's real tokens
    token_pos = (rank + n_before.unsqueeze(1)).masked_fill(~real, 1)  # (batch, S)
    target = torch.where(real, (start + q).unsqueeze(1) + rank, width)  # (batch, S): pads -> a spare column W
    ids = input_ids.new_zeros(batch, width + 1).scatter_(1, target, input_ids)[:, :width]  # pads: id 0, masked
    row_mask = attention_mask.new_zeros(batch, width + 1).scatter_(1, target, attention_mask)[:, :width]
    row_pos = token_pos.new_ones(batch, width + 1).scatter_(1, target, token_pos)[:, :width]
    embeds = model.get_input_embeddings()(ids)  # (batch, W, hidden)

    cache_mask = attention_mask.new_zeros(batch, pk)
    layers = None
    if pk:
        stack = kv.stacks_of(backbone)[0]
        layers = [(embeds.new_zeros(batch, stack.kv_heads, pk, stack.head_dim),
                   embeds.new_zeros(batch, stack.kv_heads, pk, stack.head_dim)) for _ in range(stack.n_layers)]
    for a in used:
        rows = (adapter_ids == a).nonzero().squeeze(1)  # (n_a,)
        p = int(p_of[a])
        if not p:
            continue
        if sides[a] == "input":
            slots = torch.arange(p, device=device)
            cols = start[rows].unsqueeze(1) + slots  # (n_a, p): the row's prompt, right before its tokens
            embeds[rows.unsqueeze(1), cols] = methods[a].soft_prompt().to(embeds.dtype)
            row_mask[rows.unsqueeze(1), cols] = 1
            row_pos[rows.unsqueeze(1), cols] = slots
        else:
            flat = methods[a].prefix_rows(stack.name)  # (p, width)
            for (keys, values), (k, v) in zip(layers, kv.to_layers(flat, stack, 1, embeds.dtype)):
                keys[rows, :, pk - p:] = k[0]  # (kv_heads, p, head_dim) into every row of adapter a
                values[rows, :, pk - p:] = v[0]
            cache_mask[rows, pk - p:] = 1

    columns = target.masked_fill(~real, 0)
    inputs = {"inputs_embeds": embeds, "attention_mask": torch.cat([cache_mask, row_mask], dim=1), "use_cache": False}
    if methods[0].takes_position_ids:
        inputs["position_ids"] = row_pos
    if layers is not None:
        inputs[kv.cache_kwarg(model)] = kv.dynamic_cache(layers, model.config)
    return Mixed(inputs, columns, token_pos)


@torch.no_grad()
def token_states(methods, input_ids, attention_mask, adapter_ids) -> torch.Tensor:
    """The backbone's last hidden states at the token positions, (batch, S, hidden)."""
    mixed = mixed_inputs(methods, input_ids, attention_mask, adapter_ids)
    return mixed.tokens(methods[0].backbone.model.base_model(**mixed.inputs).last_hidden_state)


@torch.no_grad()
def token_logits(methods, input_ids, attention_mask, adapter_ids) -> torch.Tensor:
    """The LM's own logits at the token positions, (batch, S, vocab) (a masked LM's MLM head)."""
    mixed = mixed_inputs(methods, input_ids, attention_mask, adapter_ids)
    return mixed.tokens(methods[0].backbone.model(**mixed.inputs).logits)


# -- heads ---------------------------------------------------------------------------------------
@torch.no_grad()
def pooled(methods, input_ids, attention_mask, adapter_ids) -> torch.Tensor:
    """(batch, hidden): what `ptune.heads.linear.pool` reads per row (causal: last real token; encoder: [CLS])."""
    hidden = token_states(methods, input_ids, attention_mask, adapter_ids)
    if methods[0].backbone.kind == "causal":
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        index = (positions * attention_mask).argmax(-1)
    else:
        index = attention_mask.argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


@torch.no_grad()
def slot_log_probs(methods, queries: list[tuple[int, list[int], int, list]]) -> list[torch.Tensor]:
    """Log-probabilities of verbalizer targets, all queries in one forward.

    queries: (adapter index, token row, pad id, targets) with targets [(position, token, candidate)]
    as `VerbalizerHead.queries` gives them (causal or masked kinds). Returns per query a (n_targets,)
    tensor of log P(token at position). Rows are right-padded, as SlotHead._forward pads them.
    """
    device = next(methods[0].backbone.model.parameters()).device
    width = max(len(q[1]) for q in queries)
    ids = torch.full((len(queries), width), queries[0][2], dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (_, row, _, _) in enumerate(queries):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    adapters = torch.tensor([q[0] for q in queries], device=device)
    ids, mask = ids.to(device), mask.to(device)
    qi = torch.tensor([n for n, q in enumerate(queries) for _ in q[3]], device=device)
    pi = torch.tensor([t[0] for q in queries for t in q[3]], device=device)
    tok = torch.tensor([t[1] for q in queries for t in q[3]], device=device)
    if methods[0].backbone.kind == "causal":  # project only the read positions, as SlotHead does
        states = token_states(methods, ids, mask, adapters)
        selected = methods[0].backbone.model.get_output_embeddings()(states[qi, pi])  # (n_targets, vocab)
    else:
        selected = token_logits(methods, ids, mask, adapters)[qi, pi]
    picked = F.log_softmax(selected.float(), dim=-1)[torch.arange(len(tok), device=device), tok]
    return list(picked.split([len(q[3]) for q in queries]))


@torch.no_grad()
def mask_states(methods, queries: list[tuple[int, list[int], int, int, str]]) -> torch.Tensor:
    """(n_queries, hidden) float32 states of soft- and proto-verbalizer rows, all in one forward.

    queries: (adapter index, token row, position to read, pad id, space) as `MaskStateHead.mask_query`
    and `.space` give them (ptune/heads/mask_state.py): "hidden" reads the last hidden state, "output" what
    the LM's output embedding reads (a masked LM's MLM transform; on causal models the same state).
    Rows are right-padded, as MaskStateHead pads them alone."""
    backbone = methods[0].backbone
    device = next(backbone.model.parameters()).device
    width = max(len(q[1]) for q in queries)
    ids = torch.full((len(queries), width), queries[0][3], dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (_, row, _, _, _) in enumerate(queries):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    adapters = torch.tensor([q[0] for q in queries], device=device)
    layout = mixed_inputs(methods, ids.to(device), mask.to(device), adapters)
    model = backbone.model
    output = torch.tensor([q[4] == "output" for q in queries], device=device)
    if backbone.kind == "masked" and bool(output.any()):
        with capture_input(model.get_output_embeddings()) as got:
            hidden = model(**layout.inputs, output_hidden_states=True).hidden_states[-1]
        hidden, out = layout.tokens(hidden), layout.tokens(got[0])
    else:
        hidden = out = layout.tokens(model.base_model(**layout.inputs).last_hidden_state)
    rows, read = torch.arange(len(queries), device=device), torch.tensor([q[2] for q in queries], device=device)
    return torch.where(output[:, None], out[rows, read], hidden[rows, read]).float()


# -- greedy generation ---------------------------------------------------------------------------
@torch.no_grad()
def greedy(methods, input_ids, attention_mask, adapter_ids, max_new_tokens: list[int],
           stop_ids: list[int], pad_id: int) -> list[list[int]]:
    """Greedy decoding of a mixed batch on a causal backbone; new token ids per row, each ending at
    (and including) its first stop id or after its own max_new_tokens.

    input_ids, attention_mask: (batch, S), padded on either side (the causal layout ends every row
    at its last column). The first forward fills a cache behind the prefix slots; each step then
    feeds one token per row at its own next position (the last token's + 1), as transformers'
    generate() does for a row alone (its position ids come from the attention mask;
    `Prompt.generate` passes them).
    """
    from transformers import DynamicCache

    backbone = methods[0].backbone
    model = backbone.model
    if backbone.kind != "causal":
        raise PtuneError(f"model {backbone.name} ({backbone.kind}) does not generate; use a causal model")
    mixed = mixed_inputs(methods, input_ids, attention_mask, adapter_ids)
    inputs = dict(mixed.inputs, use_cache=True)
    key = kv.cache_kwarg(model)
    inputs.setdefault(key, DynamicCache(config=model.config))
    cache, mask = inputs[key], inputs["attention_mask"]
    position = mixed.token_positions.masked_fill(attention_mask == 0, -1).amax(-1, keepdim=True)  # (batch, 1): last
    hidden = model.base_model(**inputs).last_hidden_state[:, -1]  # (batch, hidden)
    batch = input_ids.shape[0]
    limits = torch.tensor(max_new_tokens, device=input_ids.device)
    stops = torch.tensor(stop_ids, device=input_ids.device)
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    out: list[list[int]] = [[] for _ in range(batch)]
    for step in range(max(max_new_tokens)):
        token = model.get_output_embeddings()(hidden).argmax(-1)  # (batch,)
        for r in (~done).nonzero().squeeze(1).tolist():
            out[r].append(int(token[r]))
        done |= torch.isin(token, stops) | (limits <= step + 1)
        if bool(done.all()):
            break
        token = token.masked_fill(done, pad_id).unsqueeze(1)  # finished rows keep feeding pads (not read)
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        position = position + 1
        step_inputs = {"input_ids": token, "attention_mask": mask, "use_cache": True, key: cache}
        if "position_ids" in inputs:
            step_inputs["position_ids"] = position
        hidden = model.base_model(**step_inputs).last_hidden_state[:, -1]
    return out
