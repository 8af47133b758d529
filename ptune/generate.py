"""Batched decoding for generation tasks: padded prompts -> method.generate -> text.

Prompts are sorted by length before batching (less padding, faster), and results are put back
in input order. Generation stops at EOS or at a newline (E2E and XSum outputs are one line): every
token that decodes to pure whitespace containing a newline is an extra end-of-sequence id.

Decoder-only models get left-padded prompts (new tokens follow the last real token of every row).
Encoder-decoder models get right-padded sources: the decoder starts afresh from its start token,
so the side does not matter to it, while BART's encoder numbers its learned absolute positions
from the first slot (it takes no position_ids), so left pads would shift every real token's
position. Right pads come after the real tokens and are masked, so every row reads as if alone
(methods also move a left-padded encoder row's real tokens first: base.real_tokens_first).

A hub model's own generation_config still applies beyond what is passed here (bart-base's, for
example, sets no_repeat_ngram_size=3 and forces BOS first and EOS at the length limit), as in
transformers' pipelines and the papers' scripts, which called model.generate the same way.

`encode_sources` is the one place a task's source text becomes token ids, so training examples
and generation prompts are always encoded alike.
"""

from __future__ import annotations

import weakref

from ptune.data import Example, collate
from ptune.errors import PtuneError

DECODINGS = ("greedy", "beam")

# tokenizer -> its newline ids: decoding the whole vocabulary takes ~0.2 s, once per evaluation otherwise
_NEWLINE_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def newline_ids(tokenizer) -> list[int]:
    if tokenizer not in _NEWLINE_IDS:
        ids = []
        for tok_id in range(len(tokenizer)):
            text = tokenizer.decode([tok_id])
            if "\n" in text and not text.strip():
                ids.append(tok_id)
        _NEWLINE_IDS[tokenizer] = ids
    return _NEWLINE_IDS[tokenizer]


def special_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text of its own accord.

    T5: ([], [</s>]); BART: ([<s>], [</s>]); GPT-2 and SmolLM2: ([], []). Found by encoding one
    word with and without special tokens, since transformers 5's fast tokenizers no longer expose
    build_inputs_with_special_tokens.
    """
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a", add_special_tokens=True).input_ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []


def encode_sources(tokenizer, texts: list[str], max_len: int, kind: str = "causal") -> list[list[int]]:
    """Token ids of each source, at most max_len long; a longer text keeps its end.

    causal: the bare text (the target continues it, so no end-of-sequence marker may stand between).
    seq2seq: the text wrapped in the tokenizer's own special tokens (T5 `... </s>`, BART
    `<s> ... </s>`), as these models saw every input in pre-training and as HF's seq2seq examples
    encode them; the text is cut before wrapping so the markers survive truncation. A tokenizer
    that adds nothing (the tiny models borrow SmolLM2's) gets nothing.
    """
    ids = tokenizer(texts, add_special_tokens=False).input_ids
    if kind != "seq2seq":
        return [s[-max_len:] for s in ids]
    before, after = special_wrap(tokenizer)
    room = max_len - len(before) - len(after)
    if room < 1:
        raise ValueError(f"max_len={max_len} leaves no room for text between the special tokens")
    return [before + s[-room:] + after for s in ids]


def target_examples(tokenizer, sources: list[list[int]], targets: list[str], max_target_len: int,
                    kind: str) -> list[Example]:
    """Training examples of a generation task from encoded sources (`encode_sources`) and target texts.

    causal: source + " " + target + eos in one sequence, loss on the target part.
    seq2seq: the source feeds the encoder; the labels are the target as the tokenizer encodes a
    sentence, ending in eos (T5 `t </s>`, BART `<s> t </s>` as in HF's seq2seq fine-tuning
    scripts; eos is appended where the tokenizer adds none, as for the tiny models' borrowed
    tokenizer). Targets are cut to max_target_len tokens before the special tokens.
    """
    if kind == "seq2seq":
        before, after = special_wrap(tokenizer)
        if tokenizer.eos_token_id not in after:
            after = after + [tokenizer.eos_token_id]
        tgt = tokenizer(targets, add_special_tokens=False).input_ids
        return [Example(input_ids=s, labels=before + t[:max_target_len] + after, layout="seq2seq")
                for s, t in zip(sources, tgt)]
    tgt = tokenizer([" " + t for t in targets], add_special_tokens=False).input_ids
    out = []
    for s, t in zip(sources, tgt):
        t = t[:max_target_len] + [tokenizer.eos_token_id]
        out.append(Example(input_ids=s + t, labels=[-100] * len(s) + t))
    return out


def beams(decoding: str, num_beams: int) -> int:
    """generate()'s num_beams for a task's `decoding` (greedy: 1; beam: `num_beams`, at least 2)."""
    if decoding not in DECODINGS:
        raise PtuneError(f"task.decoding={decoding!r} is invalid: choose one of {', '.join(DECODINGS)}")
    if decoding == "greedy":
        return 1
    if not isinstance(num_beams, int) or isinstance(num_beams, bool) or num_beams < 2:
        raise PtuneError(f"task.num_beams={num_beams!r} is invalid with task.decoding=beam: must be an integer >= 2 "
                         f"(one beam is greedy search: task.decoding=greedy)")
    return num_beams


def generate_texts(method, sources: list[str], batch_size: int = 16, num_beams: int = 1,
                   max_new_tokens: int = 64, max_source_len: int = 256) -> list[str]:
    """One line of generated text per source text (encoded by `encode_sources`)."""
    encoded = encode_sources(method.backbone.tokenizer, sources, max_source_len, method.backbone.kind)
    return generate_from_ids(method, encoded, batch_size, num_beams, max_new_tokens)


def generate_from_ids(method, encoded: list[list[int]], batch_size: int = 16, num_beams: int = 1,
                      max_new_tokens: int = 64) -> list[str]:
    """One line of generated text per encoded source (ids as `encode_sources` gives them)."""
    tok = method.backbone.tokenizer
    side = "right" if method.backbone.kind == "seq2seq" else "left"
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    stop = [tok.eos_token_id] + newline_ids(tok)
    out: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([Example(encoded[i], encoded[i]) for i in idx], tok.pad_token_id, padding_side=side)
        new = method.generate(
            batch["input_ids"], batch["attention_mask"], num_beams=num_beams, do_sample=False,
            max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=tok.pad_token_id,
        )
        for row, i in enumerate(idx):
            out[i] = tok.decode(new[row], skip_special_tokens=True).split("\n")[0].strip()
    return out
