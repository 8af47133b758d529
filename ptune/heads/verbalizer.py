"""The verbalizer head: class scores from the LM's own word predictions at a template's {mask}.

PET (Schick & Schütze 2021, "Exploiting Cloze Questions for Few Shot Text Classification") and
LM-BFF (Gao, Fisch & Chen 2021) classify by asking the masked LM which label word fills the mask;
Lester et al. 2021 let T5's decoder produce the label text; GPT-3 style prompting reads the next
token after the template. One head covers all three, per backbone kind:

- masked (BERT): the MLM head's distribution at [MASK];
- causal (GPT-2, Llama): the next-token distribution after the template's text up to {mask}
  (text after {mask} cannot be seen by a left-to-right model: it is dropped, and a template that
  puts a *field* after {mask} is refused for causal models, see `check_template`);
- seq2seq (T5, BART): the encoder reads the template with the tokenizer's mask token at {mask}
  (BART's <mask>), else T5's sentinel <extra_id_0> (its span-corruption format), else nothing (as
  Lester et al.'s T5 inputs); the decoder scores the label word after its start token, the tokens
  ptune's seq2seq targets open with (BART's <s>) and the sentinel, if any ("<extra_id_0> word").
An encoder without an LM head (MiniLM) cannot score words: refused (use the linear head).

Multi-token label words are scored by all their pieces, teacher-forced: log P(w) = sum_j log
P(w_j | x, w_<j). Causal and seq2seq models read the earlier pieces as ordinary input. A masked LM
gets as many [MASK]s as the word has pieces and fills them left to right: piece j is scored with
pieces < j written in and pieces >= j masked (one forward per piece; PET's inference fills the
most confident mask first, we fix the order so that training and evaluation score alike).

Several words per label are combined by logsumexp: log sum_w P(w | x), the probability that the
model says any of the label's words. The mean of log-probs (a geometric mean) would let one word
the model never says drag its class down; the sum of probabilities does not.

Loss: cross-entropy over the classes' scores (PET's loss). For single-token words this equals
PET's cross-entropy over the raw label-word logits: log_softmax over the vocabulary only shifts
every word's logit by the same constant.

`VocabHead` (LAMA, P@1): the whole vocabulary is the class set; scores = the single-token
distribution at the mask, (batch, vocab).

Neither head has parameters: what trains is the method (and under fine-tune the LM itself, MLM
head included). Batches carry `mask_pos`, the mask's index in each example's own ids (padding
excluded), and optionally `soft_mask` for p-tuning.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from ptune.errors import PtuneError
from ptune.generate import special_wrap

KINDS = ("causal", "masked", "seq2seq")


def takes_soft_mask(method) -> bool:
    """Whether the method places continuous prompts at marked positions (p-tuning)."""
    return "soft_mask" in inspect.signature(method.model_inputs).parameters


def check_backbone(backbone, what: str = "task.head=verbalizer") -> None:
    if backbone.kind == "encoder":
        raise PtuneError(f"{what} reads the model's word predictions, and model={backbone.name} is an encoder without "
                         f"an LM head (no MLM head ships with it); use task.head=linear, or a model with an LM head "
                         f"(tiny-bert, bert, smollm2-135m, t5, bart)")
    if backbone.kind not in KINDS:
        raise PtuneError(f"{what} does not support model.kind={backbone.kind}")


def check_template(template, backbone) -> None:
    """A causal model reads only what precedes {mask}: it must be preceded by something and
    followed by no field (literal words after it are dropped)."""
    if backbone.kind != "causal":
        return
    parts = template.parts
    at = next(i for i, p in enumerate(parts) if p.kind == "mask")
    after = [p.value for p in parts[at + 1:] if p.kind == "field"]
    if after:
        raise PtuneError(f"{template.key}={template.source!r} puts {{{after[0]}}} after {{mask}}, and a causal model "
                         f"(model={backbone.name}) predicts the mask from the text before it only; move {{mask}} to the end")
    if not parts[:at] and not special_wrap(backbone.tokenizer)[0]:
        raise PtuneError(f"{template.key}={template.source!r} starts with {{mask}}, and a causal model has nothing to "
                         f"predict it from; put the mask after the input")


def word_pieces(tokenizer, word: str, space: str, where: str) -> tuple[int, ...]:
    """The ids of a label word as it appears after the template's whitespace before {mask}."""
    ids = tokenizer(space + word, add_special_tokens=False).input_ids
    unk = tokenizer.unk_token_id
    if not ids or (unk is not None and unk in ids):
        raise PtuneError(f"{where}: the word {word!r} cannot be represented by the tokenizer "
                         f"({'no tokens' if not ids else 'it becomes ' + str(tokenizer.unk_token)}); choose another word")
    return tuple(ids)


def whole_words(tokenizer, space: str) -> list[tuple[str, int]]:
    """(word, token id) for every token that is an alphabetic word which tokenizes back to itself
    after `space` (the template's whitespace before {mask})."""
    special = set(tokenizer.all_special_ids)
    out = []
    for tid in range(len(tokenizer)):
        if tid in special:
            continue
        word = tokenizer.decode([tid]).strip()
        if len(word) < 2 or not word.isalpha():
            continue
        if tokenizer(space + word, add_special_tokens=False).input_ids == [tid]:
            out.append((word, tid))
    return out


def label_pieces(task, backbone) -> list[list[tuple[int, ...]]]:
    """Per class its label words' piece ids (task.verbalizer), as the word verbalizer scores them:
    after the template's whitespace before {mask}."""
    return [[word_pieces(backbone.tokenizer, w, task.template.mask_space, f"task.verbalizer.{label}") for w in ws]
            for label, ws in zip(task.labels, task.verbalizer)]


class SlotHead(nn.Module):
    """What both heads share: queries around the mask slot and one batched forward over them."""

    reads_lm_head = True  # fine-tune trains the LM head under it (see methods/fine_tune.py)

    def __init__(self, backbone):
        super().__init__()
        if self.reads_lm_head:
            check_backbone(backbone)
        elif backbone.kind not in (*KINDS, "encoder"):  # heads with tensors of their own (mask_state.py)
            raise PtuneError(f"task.head does not support model.kind={backbone.kind}")
        self.kind = backbone.kind
        tok = backbone.tokenizer
        self.mask_id = tok.mask_token_id
        self.pad_id = tok.pad_token_id
        start = getattr(backbone.model.config, "decoder_start_token_id", None)
        if self.kind == "seq2seq" and start is None:
            raise PtuneError(f"model {backbone.name} sets no decoder_start_token_id, which the verbalizer's decoder "
                             f"scoring starts from; set it in the model's config")
        self.start_id = start
        # seq2seq: what the encoder reads at {mask} and what the decoder reads before the word.
        # Encoder: the tokenizer's mask token (BART's <mask>), else T5's first sentinel <extra_id_0>
        # (span corruption), else nothing. Decoder: its start token, then the tokens ptune's seq2seq
        # targets open with (BART `<s>`, as in tasks' training labels: generate.special_wrap), then
        # the sentinel where the encoder got one (T5's targets read "<extra_id_0> word ...").
        self.enc_slot, self.dec_prefix = [], [start]
        if self.kind == "seq2seq":
            sentinel = None
            if self.mask_id is None:
                sid = tok.convert_tokens_to_ids("<extra_id_0>")
                sentinel = sid if isinstance(sid, int) and sid != tok.unk_token_id else None
            slot = self.mask_id if self.mask_id is not None else sentinel
            self.enc_slot = [slot] if slot is not None else []
            self.dec_prefix = [start, *special_wrap(tok)[0], *([sentinel] if sentinel is not None else [])]

    # -- queries: (input row, soft row, decoder row, [(position, token, candidate)]) --------------
    def _queries(self, ids: list[int], soft: list[bool], pos: int, cands: list[tuple[int, ...]]) -> dict:
        """Input rows that score each candidate's pieces, deduplicated; key -> [ids, soft, dec, targets]."""
        out: dict = {}

        def add(key, row, srow, dec, target):
            q = out.setdefault(key, [row, srow, dec, []])
            q[3].append(target)

        for c, cand in enumerate(cands):
            k = len(cand)
            if self.kind == "causal":
                row = ids[:pos] + list(cand[:-1])
                srow = soft[:pos] + [False] * (k - 1)
                for j in range(k):
                    add(tuple(row), row, srow, None, (pos - 1 + j, cand[j], c))
            elif self.kind == "masked":
                for j in range(k):
                    row = ids[:pos] + list(cand[:j]) + [self.mask_id] * (k - j) + ids[pos + 1:]
                    srow = soft[:pos] + [False] * k + soft[pos + 1:]
                    add(tuple(row), row, srow, None, (pos + j, cand[j], c))
            else:
                enc = ids[:pos] + self.enc_slot + ids[pos + 1:]
                senc = soft[:pos] + [False] * len(self.enc_slot) + soft[pos + 1:]
                dec = self.dec_prefix + list(cand[:-1])
                for j in range(k):
                    add(tuple(dec), enc, senc, dec, (len(self.dec_prefix) - 1 + j, cand[j], c))
        return out

    def _forward(self, method, rows, softs, decs) -> torch.Tensor:
        """Logits (n_rows, positions, vocab) for right-padded rows (decoder positions for seq2seq)."""
        device = next(method.backbone.model.parameters()).device
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        soft = torch.zeros_like(ids, dtype=torch.bool)
        for i, (r, s) in enumerate(zip(rows, softs)):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
            soft[i, :len(s)] = torch.tensor(s, dtype=torch.bool)
        ids, mask, soft = ids.to(device), mask.to(device), soft.to(device)
        extra = {"soft_mask": soft} if takes_soft_mask(method) and soft.any() else {}
        inputs = method.model_inputs(ids, mask, **extra)
        model = method.backbone.model
        if self.kind == "seq2seq":
            dwidth = max(len(d) for d in decs)
            dec = torch.full((len(decs), dwidth), self.pad_id, dtype=torch.long)
            for i, d in enumerate(decs):  # right-padded: a causal decoder's real positions never see the pads
                dec[i, :len(d)] = torch.tensor(d)
            inputs["use_cache"] = False
            return model(**inputs, decoder_input_ids=dec.to(device)).logits
        inputs["use_cache"] = False
        if self.kind == "masked":
            return model(**inputs).logits[:, method.n_prepended:]
        # causal: project only the positions that are read (see lm.lm_loss); a dense view is built
        # by the caller from (row, position) pairs, so return hidden states here
        return model.base_model(**inputs).last_hidden_state[:, method.n_prepended:]

    def _target_log_probs(self, method, batch, cands_of_row) -> list[list[tuple[int, torch.Tensor]]]:
        """Per row: [(candidate, log-prob of one piece)] for every piece of every candidate."""
        ids, attn, pos = batch["input_ids"], batch["attention_mask"], batch["mask_pos"]
        soft = batch.get("soft_mask")
        queries = []  # (row index, [ids, soft, dec, targets])
        for r in range(ids.shape[0]):
            keep = attn[r].bool()
            row = ids[r][keep].tolist()
            srow = soft[r][keep].tolist() if soft is not None else [False] * len(row)
            for q in self._queries(row, srow, int(pos[r]), cands_of_row(r)).values():
                queries.append((r, q))
        out: list[list] = [[] for _ in range(ids.shape[0])]
        for (r, q), picked in zip(queries, self._log_probs(method, [q for _, q in queries])):
            out[r] += [(c, v) for (_, _, c), v in zip(q[3], picked)]
        return out

    def _log_probs(self, method, queries: list[list]) -> list[torch.Tensor]:
        """One forward over queries [ids, soft, dec, targets [(position, token, key)]]: per query a
        (n_targets,) tensor of log P(token at position) (shared with the rules head, rules.py)."""
        states = self._forward(method, [q[0] for q in queries], [q[1] for q in queries], [q[2] for q in queries])
        qi, pi, toks = [], [], []
        for n, q in enumerate(queries):
            for p, tok, _ in q[3]:
                qi.append(n), pi.append(p), toks.append(tok)
        selected = states[torch.tensor(qi, device=states.device), torch.tensor(pi, device=states.device)]
        if self.kind == "causal":
            selected = method.backbone.model.get_output_embeddings()(selected)  # (n_targets, vocab)
        logp = F.log_softmax(selected.float(), dim=-1)
        picked = logp[torch.arange(len(toks), device=logp.device), torch.tensor(toks, device=logp.device)]
        return list(picked.split([len(q[3]) for q in queries]))


class VerbalizerHead(SlotHead):
    """Class scores (batch, n_classes): logsumexp over a class's words of sum-of-pieces log-probs.

    words: per class (in class-index order) the label words' piece ids, e.g.
    [[(1099,)], [(2307,), (8412, 553)]]: class 0 one single-token word, class 1 two words.
    template, triggers: the task's template source and trigger tokens, only recorded in config()
    (adapter_config.json, with the triggers also as text), so a run's prompt reads without its config.yaml.
    """

    def __init__(self, backbone, words: list[list[tuple[int, ...]]], labels: list[str] | None = None,
                 template: str | None = None, triggers: list[str] | None = None):
        super().__init__(backbone)
        self.words = words
        self.labels = labels
        self.prompt = {k: v for k, v in (("template", template), ("triggers", triggers)) if v is not None}
        if triggers:  # the same as text, e.g. " atmosphere totally" for ["Ġatmosphere", "Ġtotally"]
            self.prompt["triggers_text"] = backbone.tokenizer.convert_tokens_to_string(list(triggers))
        self.cands = sorted({w for ws in words for w in ws})
        index = {w: i for i, w in enumerate(self.cands)}
        self.class_cands = [[index[w] for w in ws] for ws in words]

    def scores(self, method, batch) -> torch.Tensor:
        per_row = self._target_log_probs(method, batch, lambda r: self.cands)
        return torch.stack([self.class_scores(pieces) for pieces in per_row])  # (batch, n_classes)

    # -- for callers that run the forward themselves (mixed-adapter batches, ptune.infer.pool) --
    def queries(self, ids: list[int], mask_pos: int) -> list[tuple[list[int], list[tuple[int, int, int]]]]:
        """The input rows that score this head's words for one example (token ids `ids`, {mask} at
        `mask_pos`, no soft slots), each with its targets [(position, token, candidate)]: read
        log P(token) at position of the row's output to score a piece of candidate word c."""
        return [(q[0], q[3]) for q in self._queries(ids, [False] * len(ids), mask_pos, self.cands).values()]

    def class_scores(self, pieces: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """(n_classes,) from one example's [(candidate, log-prob of one of its pieces)]: a word's
        log-prob is the sum of its pieces', a class's the logsumexp over its words."""
        word = [torch.zeros((), device=pieces[0][1].device) for _ in self.cands]
        for c, v in pieces:
            word[c] = word[c] + v
        words = torch.stack(word)  # (n_cands,): log P(word | x)
        return torch.stack([torch.logsumexp(words[ix], 0) for ix in self.class_cands])

    def config(self) -> dict:
        return {"kind": "verbalizer", "labels": self.labels, "word_pieces": [[list(w) for w in ws] for ws in self.words],
                "combine": "logsumexp over words of the sum of piece log-probs", **self.prompt}


class VocabHead(SlotHead):
    """Scores over the whole vocabulary at the mask (single-token answers): (batch, vocab) log-probs."""

    def scores(self, method, batch) -> torch.Tensor:
        ids, attn, pos = batch["input_ids"], batch["attention_mask"], batch["mask_pos"]
        soft = batch.get("soft_mask")
        rows, softs, decs, where = [], [], [], []
        for r in range(ids.shape[0]):
            keep = attn[r].bool()
            row = ids[r][keep].tolist()
            srow = soft[r][keep].tolist() if soft is not None else [False] * len(row)
            [q] = self._queries(row, srow, int(pos[r]), [(0,)]).values()  # one placeholder single-token answer
            rows.append(q[0]), softs.append(q[1]), decs.append(q[2]), where.append(q[3][0][0])
        states = self._forward(method, rows, softs, decs)
        selected = states[torch.arange(len(rows), device=states.device), torch.tensor(where, device=states.device)]
        if self.kind == "causal":
            selected = method.backbone.model.get_output_embeddings()(selected)
        return F.log_softmax(selected.float(), dim=-1)  # (batch, vocab)

    def config(self) -> dict:
        return {"kind": "vocab", "scores": "log-probs over the whole vocabulary at the mask"}


def slot_scores(method, batch) -> torch.Tensor:
    head = getattr(method, "head", None)
    if not isinstance(head, SlotHead):
        raise PtuneError("this method has no verbalizer head; train with task.head=verbalizer")
    return head.scores(method, batch)


def slot_loss(method, batch) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the head's classes (PET) and the number of examples; a head with a
    loss of its own (ProtoVerb's contrastive losses, proto_verbalizer.py) gives it instead."""
    head = getattr(method, "head", None)
    if hasattr(head, "loss"):
        return head.loss(method, batch)
    scores = slot_scores(method, batch)
    labels = batch["labels"].to(scores.device)
    return F.cross_entropy(scores, labels, reduction="sum"), labels.shape[0]
