"""Batched decoding for generation tasks: left-padded prompts -> method.generate -> text.

Prompts are sorted by length before batching (less padding, faster), and results are put back
in input order. Generation stops at EOS or at a newline (E2E and XSum outputs are one line): every
token that decodes to pure whitespace containing a newline is an extra end-of-sequence id.
"""

from __future__ import annotations

import torch

from ptune.data import Example, collate


def _newline_ids(tokenizer) -> list[int]:
    ids = []
    for tok_id in range(len(tokenizer)):
        text = tokenizer.decode([tok_id])
        if "\n" in text and not text.strip():
            ids.append(tok_id)
    return ids


def generate_texts(method, sources: list[str], batch_size: int = 16, num_beams: int = 1,
                   max_new_tokens: int = 64, max_source_len: int = 256) -> list[str]:
    tok = method.backbone.tokenizer
    encoded = [tok(s, add_special_tokens=False).input_ids[-max_source_len:] for s in sources]
    order = sorted(range(len(sources)), key=lambda i: len(encoded[i]))
    stop = [tok.eos_token_id] + _newline_ids(tok)
    out: list[str] = [""] * len(sources)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([Example(encoded[i], encoded[i]) for i in idx], tok.pad_token_id, padding_side="left")
        new = method.generate(
            batch["input_ids"], batch["attention_mask"], num_beams=num_beams, do_sample=False,
            max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=tok.pad_token_id,
        )
        for row, i in enumerate(idx):
            out[i] = tok.decode(new[row], skip_special_tokens=True).split("\n")[0].strip()
    return out
