"""Automatic templates: LM-BFF, Gao, Fisch & Chen 2021, "Making Pre-trained Language Models Better
Few-shot Learners", §5.2 (their tools/generate_template.py), and ptune's variant for causal LMs.

Stage 1, generation. Every few-shot training row (x, y) with its label word w(y) (the task's
verbalizer, first word per class) becomes a generation input with gaps around the label word;
one beam search, shared by all rows, fills the gaps with words X, Y that maximise the SUM over the
rows of the log-likelihood of the decoded sequence (rows are the batch; a hypothesis is one X, Y
for all of them; `summed_beam`). A hypothesis becomes a template ("placements", `search.placements`):

    after    {S1} X {mask} Y          T5 in: <S1> <extra_id_0> w <extra_id_1>      (the paper's three)
    before   X {mask} Y {S1}          T5 in: <extra_id_0> w <extra_id_1> <S1>
    between  {S1} X {mask} Y {S2}     T5 in: <S1> <extra_id_0> w <extra_id_1> <S2>
  default: after + before for one field, between for two or more; causal models: after.

- T5 family (span infilling, its pre-training format): the decoder writes
  `<extra_id_0> X <extra_id_1> Y <extra_id_2>`; `parse_spans` reads X and Y from that output.
- Other seq2seq models (BART: denoising): the encoder reads the input with the tokenizer's mask
  token in each gap (`<S1> <mask> w <mask>`) and the decoder regenerates the whole text. A shared
  beam cannot hold the rows' own text, so the parts that must be reproduced (the input and the
  label word) are teacher-forced (their log-likelihood counts) and only X and Y are decoded: the
  output reproduces the input by construction, X and Y are exactly the decoded gaps, and "the
  decoded text does not reproduce the input, so the candidate is dropped" cannot arise.
- Causal models (GPT-2, Llama; ptune's own variant, not in the paper): the model continues
  "<fields> " with the gap t (1..max_tokens tokens) and then must say the label word, so a
  hypothesis t scores sum_i log P(t | x_i) + log P(w(y_i) | x_i t). Candidate: "{fields} t {mask} ."
  (the fields in the task's order, then t, the label slot and a full stop, which a causal
  verbalizer does not read but a masked or seq2seq one does).
- Masked models (BERT) cannot write text left to right: refused (generate with T5 or a causal
  model, then train BERT with the template found).
Gap tokens may not be special or added tokens, whitespace-only, hold a newline or partial UTF-8.
A tokenizer without sentinels or a mask token (the tiny test models borrow SmolLM2's) stands in
with its added non-special tokens (<repo_name>, ...), logged.

Stage 2, ranking: every distinct template (the final beam of each placement) is scored zero-shot
on the few-shot dev rows with the task's verbalizer; the best (dev accuracy, then log-likelihood,
then order) is the result. All candidates with their scores are in candidates.jsonl; one the task
refuses (e.g. longer than task.max_len allows) is kept with `dropped` and its reason.

What differs from LM-BFF: their script averages the rows' logits before normalising; ptune sums
log-probabilities (the paper's objective). They keep beam/2 per single-sentence placement, open the
`before` input with ".", change the case of the sentence's first letter and cut sentence 1's last
character for pairs; ptune keeps the whole final beam and the texts as they are. They forbid a
few T5 ids ("▁", "....", runs of "."); ptune the token classes above. Their stage 2 fine-tunes
every candidate and ranks by dev accuracy after training; ptune's is zero-shot (nothing trained).
Nothing here is random: a resumed search redoes an unfinished placement exactly (tested).
"""

from __future__ import annotations

import copy
import logging
import time
import weakref

import torch
import torch.nn.functional as F

from ptune.errors import PtuneError
from ptune.generate import special_wrap
from ptune.heads.verbalizer import word_pieces
from ptune.methods.kv import cache_kwarg
from ptune.search.base import elapsed, finish
from ptune.tasks import TASKS
from ptune.tasks.templates import Template

log = logging.getLogger("ptune")

PLACEMENTS = ("after", "before", "between")
SPAN_MODELS = ("t5", "mt5", "umt5", "longt5")  # config.model_type of models pre-trained on span infilling
SAVE_EVERY = 5  # dev-scored candidates between two saves


def check(cfg) -> None:
    s = cfg.search
    for key in ("beam", "max_tokens"):
        v = s.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PtuneError(f"search.{key}={v!r} is invalid: must be an integer >= 1")
    if cfg.model.kind not in ("causal", "seq2seq"):
        raise PtuneError(f"ptune search template generates templates with a seq2seq (T5, BART) or causal (GPT-2, "
                         f"SmolLM2) model, and model={cfg.model.name} is {cfg.model.kind}; generate with one (e.g. "
                         f"model=t5) and train model={cfg.model.name} with the template it finds (overrides.txt)")
    p = s.get("placements")
    if p is not None:
        p = list(p) if not isinstance(p, str) and hasattr(p, "__iter__") else None
        if not p or any(x not in PLACEMENTS for x in p) or len(set(p)) != len(p):
            raise PtuneError(f"search.placements={s.placements!r} is invalid: null or a list of distinct "
                             f"{', '.join(PLACEMENTS)}")
        if cfg.model.kind == "causal" and p != ["after"]:
            raise PtuneError(f"search.placements={p} puts text after {{mask}}, which a causal model "
                             f"(model={cfg.model.name}) cannot read; use search.placements=[after] or null")

        fields = getattr(TASKS.get(cfg.task.name), "fields", None)
        if fields:  # a custom task's fields come from its files: checked when the search starts
            placements(p, cfg.model.kind, fields)
    if cfg.task.get("few_shot") is None:
        raise PtuneError("ptune search template searches on the few-shot protocol's rows: set task.few_shot=K "
                         "(e.g. 16) and task.few_shot_seed")


def placements(value, kind: str, fields) -> list[str]:
    if value is None:
        return ["after"] if kind == "causal" else ["after", "before"] if len(fields) == 1 else ["between"]
    if "between" in value and len(fields) < 2:
        raise PtuneError(f"search.placements=between puts the label between two fields, and the task has one "
                         f"({fields[0]}); use after or before")
    return list(value)


# -- what the model reads and writes per training row ---------------------------------------------
def _stand_ins(tok) -> list[int]:
    special = set(tok.all_special_ids)
    return sorted(i for i in tok.get_added_vocab().values() if i not in special)


def markers(backbone, n: int) -> list[int]:
    """Gap markers: T5's sentinels <extra_id_0..n-1>, else (n == 1) the mask token, else stand-ins."""
    tok = backbone.tokenizer
    if n > 1:
        ids = [tok.convert_tokens_to_ids(f"<extra_id_{k}>") for k in range(n)]
        if all(isinstance(i, int) and i != tok.unk_token_id and tok.convert_ids_to_tokens(i) == f"<extra_id_{k}>"
               for k, i in enumerate(ids)):
            return ids
    elif tok.mask_token_id is not None:
        return [tok.mask_token_id]
    spare = _stand_ins(tok)
    if len(spare) < n:
        what = "sentinels <extra_id_k>" if n > 1 else "mask token"
        raise PtuneError(f"model {backbone.name}: its tokenizer has no {what}"
                         f" to mark the template's gaps, nor {n} spare added tokens to stand in")
    log.info("template search: the tokenizer has no %s; standing in with %s", "sentinels" if n > 1 else "mask token",
             tok.convert_ids_to_tokens(spare[:n]))
    return spare[:n]


_FREE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def free_tokens(tok, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) bool: the tokens a gap may hold (see the module doc); cached per tokenizer."""
    if tok not in _FREE:
        banned = set(tok.all_special_ids) | set(tok.get_added_vocab().values())
        ok = torch.zeros(vocab_size, dtype=torch.bool)
        for i, text in enumerate(tok.batch_decode([[i] for i in range(min(len(tok), vocab_size))])):
            ok[i] = i not in banned and bool(text.strip()) and not any(c in text for c in "\n\r\ufffd")
        _FREE[tok] = ok
    return _FREE[tok]


def programs(backbone, task, rows: list[dict], placement: str, max_tokens: int) -> tuple[str, list[dict]]:
    """(format, per row {"encoder": ids or None, "forced": [ids, ...]}): the decoded sequence is
    forced[0] gap_1 forced[1] ... gap_n forced[n], everything after forced[0] scored. Format:
    spans (T5), regenerate (BART and other seq2seq), causal."""
    tok, kind = backbone.tokenizer, backbone.kind
    fields = ["{" + f + "}" for f in task.fields]
    layout = {"after": [*fields, "{mask}"], "before": ["{mask}", *fields],
              "between": [fields[0], "{mask}", *fields[1:]]}[placement]
    layout = Template(" ".join(layout), key=f"search.placements={placement}")
    before, after = special_wrap(tok)
    spans = getattr(backbone.model.config, "model_type", "") in SPAN_MODELS
    fmt = "causal" if kind == "causal" else "spans" if spans else "regenerate"
    marks = markers(backbone, 3 if spans else 1) if kind == "seq2seq" else []
    start = getattr(backbone.model.config, "decoder_start_token_id", None)
    end = after if tok.eos_token_id in after else [*after, tok.eos_token_id]
    out = []
    for r in rows:
        word = task.verbalizer[r["label"]][0]
        label = list(word_pieces(tok, word, " ", f"task.verbalizer.{task.labels[r['label']]}"))
        reserve = len(before) + len(after) + len(label) + (max_tokens if kind == "causal" else 2)
        if task.max_len - reserve - 1 < len(task.fields):  # every field keeps a token (ptune.tasks.templates)
            raise PtuneError(f"task.max_len={task.max_len} leaves no room for the inputs beside the label word "
                             f"{word!r}, the gap markers and search.max_tokens={max_tokens}; raise task.max_len")
        enc = layout.encode(tok, r, task.max_len - reserve, keep_soft=False, mask_id=-1, special=([], []))
        head, tail = enc.ids[:enc.mask_pos], enc.ids[enc.mask_pos + 1:]
        if fmt == "causal":
            out.append({"encoder": None, "forced": [before + head, label]})
        elif fmt == "spans":
            s0, s1, s2 = marks
            out.append({"encoder": before + head + [s0] + label + [s1] + tail + after,
                        "forced": [[start, s0], [s1], [s2]]})
        else:
            m = marks[0]
            out.append({"encoder": before + head + [m] + label + [m] + tail + after,
                        "forced": [[start, *before, *head], label, tail + end]})
    return fmt, out


# -- one beam across all rows ---------------------------------------------------------------------
class Stepper:
    """step(hyps) for `summed_beam` on a backbone: hyps are tuples of gaps (the last one open);
    returns ext (n_hyps, vocab), the rows' summed log P(next token), and close (n_hyps,), their
    summed log P(the forced tokens after the open gap). One forward per (hypothesis, row) gives both."""

    def __init__(self, backbone, progs: list[dict], batch_size: int):
        self.model, self.kind, self.progs = backbone.model, backbone.kind, progs
        self.pad, self.batch_size = backbone.tokenizer.pad_token_id, batch_size
        self.device = next(self.model.parameters()).device
        self._prefixes = {}  # causal: row -> (log P(next token) after its forced[0], its KV cache), filled by _prefix
        if self.kind == "seq2seq":  # the encoder reads each row once
            ids, mask = self._pad([p["encoder"] for p in progs])
            with torch.no_grad():
                self.enc = self.model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            self.enc_mask = mask  # (rows, src) and enc (rows, src, d)

    def _pad(self, seqs):
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):  # right-padded: real tokens never see the pads
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def _log_probs(self, seqs, where, rows) -> torch.Tensor:
        """(sum of len(where[i])) positions' log-probs over the vocabulary, row after row.

        The LM's own forward (T5's rescaling and BART's final_logits_bias stay its code), with its
        output projection applied to the positions read only: a pre-hook on the output embeddings
        selects them, (rows, seq, d) -> (n_read, d), which spares a (rows, seq, vocab) tensor."""
        from transformers.modeling_outputs import BaseModelOutput

        ids, mask = self._pad(seqs)
        sel_r = torch.tensor([i for i, w in enumerate(where) for _ in w], device=self.device)
        sel_p = torch.tensor([p for w in where for p in w], device=self.device)
        hook = self.model.get_output_embeddings().register_forward_pre_hook(lambda _, a: (a[0][sel_r, sel_p],))
        try:
            if self.kind == "causal":
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            else:
                idx = torch.tensor(rows, device=self.device)
                logits = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=self.enc[idx]),
                                    attention_mask=self.enc_mask[idx], decoder_input_ids=ids, use_cache=False).logits
        finally:
            hook.remove()
        return F.log_softmax(logits.float(), -1)  # (n_read, vocab)

    def __call__(self, hyps):
        if self.kind == "causal" and len({len(g) for g in hyps}) == 1 and len({len(g[-1]) for g in hyps}) == 1:
            return self._causal(hyps)  # summed_beam's live hypotheses: one open gap, all of one length
        items = []  # (hypothesis, row, sequence, position of the next token, forced tokens)
        for h, gaps in enumerate(hyps):
            for r, p in enumerate(self.progs):
                seq = list(p["forced"][0])
                for k, gap in enumerate(gaps):
                    seq += list(gap) + (p["forced"][k + 1] if k + 1 < len(gaps) else [])
                forced = p["forced"][len(gaps)]
                items.append((h, r, seq + forced, len(seq) - 1, forced))
        ext = torch.zeros(len(hyps), self.model.get_output_embeddings().weight.shape[0])
        close = torch.zeros(len(hyps), dtype=torch.float64)
        for s in range(0, len(items), self.batch_size):
            chunk = items[s:s + self.batch_size]
            where = [range(at, at + len(forced)) for _, _, _, at, forced in chunk]
            logp = self._log_probs([c[2] for c in chunk], where, [c[1] for c in chunk]).cpu()
            n = 0
            for (h, _, _, _, forced), w in zip(chunk, where):
                ext[h] += logp[n, :ext.shape[1]]
                close[h] += float(logp[torch.arange(n, n + len(w)), torch.tensor(forced)].sum())
                n += len(w)
        return ext, close

    @torch.no_grad()
    def _prefix(self, r: int):
        """Row r's forced[0] read once: (log P(next token) after it, (vocab,); its key/value cache)."""
        if r not in self._prefixes:
            ids = torch.tensor([self.progs[r]["forced"][0]], device=self.device)
            out = self.model(input_ids=ids, use_cache=True)
            past = out.get("cache", None) or out.get("past_key_values", None)  # 5.24 renames it (ptune.methods.kv)
            self._prefixes[r] = (F.log_softmax(out.logits[0, -1].float(), -1).cpu(), past)
        return self._prefixes[r]

    @torch.no_grad()
    def _causal(self, hyps):
        """The same (ext, close) as the general path for a causal LM, which rereads every row's
        prefix for every hypothesis at every step: here each row's prefix is read once and cached,
        and a step feeds only gap + label word (at most max_tokens + len(label) tokens) after it,
        the row's hypotheses in batches. Position i of the concatenated log-probs predicts suffix
        token i (i = 0 from the prefix's last position)."""
        n, t = len(hyps), len(hyps[0][-1])
        kwarg = cache_kwarg(self.model)  # read off the forward's signature: once per step, not per batch
        ext = torch.zeros(n, self.model.get_output_embeddings().weight.shape[0])
        close = torch.zeros(n, dtype=torch.float64)
        for r, prog in enumerate(self.progs):
            first, cache = self._prefix(r)
            start, label = len(prog["forced"][0]), list(prog["forced"][1])
            feed = t + len(label) - 1  # suffix tokens whose next-token distribution is read
            for s in range(0, n, self.batch_size):
                chunk = hyps[s:s + self.batch_size]
                logp = first.expand(len(chunk), 1, -1)
                if feed > 0:
                    ids = torch.tensor([list(g[-1]) + label for g in chunk], device=self.device)[:, :feed]
                    past = copy.deepcopy(cache)
                    past.batch_repeat_interleave(len(chunk))
                    pos = torch.arange(start, start + feed, device=self.device).expand(len(chunk), -1)
                    out = self.model(input_ids=ids, position_ids=pos, use_cache=True, **{kwarg: past})
                    logp = torch.cat([logp, F.log_softmax(out.logits.float(), -1).cpu()], 1)  # (chunk, feed + 1, vocab)
                ext[s:s + len(chunk)] += logp[:, t, :ext.shape[1]]
                picked = logp[:, torch.arange(t, t + len(label)), torch.tensor(label)]  # (chunk, len(label))
                close[s:s + len(chunk)] += picked.double().sum(1)
        return ext, close


def summed_beam(step, n_gaps: int, beam: int, max_tokens: int, allowed: torch.Tensor) -> list[tuple[tuple, float]]:
    """Beam search over gap fillings shared by all rows: [(gaps, summed log-likelihood)], best first.

    A hypothesis is n_gaps tuples of token ids, filled left to right; at each step an open one either
    takes one more token (the top `beam` allowed by summed log-prob) or closes its gap (scored by
    the forced tokens that follow it), while the gaps hold fewer than max_tokens tokens in all (and
    at least one). The best `beam` of finished and open ones go on, until all are finished; ties
    go to the smaller token ids, so the search is deterministic."""
    live, done = [(((),), 0.0)], []
    k = min(beam, int(allowed.sum()))
    while live:
        ext, close = step([g for g, _ in live])
        pool = [(g, s, True) for g, s in done]
        for (gaps, score), e, c in zip(live, ext, close):
            used, last = sum(len(g) for g in gaps), len(gaps) == n_gaps
            if used or not last:
                pool.append((gaps if last else gaps + ((),), score + float(c), last))
            if used < max_tokens and k:
                top = e.masked_fill(~allowed, float("-inf")).topk(k)
                pool += [(gaps[:-1] + (gaps[-1] + (t,),), score + float(v), False)
                         for v, t in zip(top.values.tolist(), top.indices.tolist())]
        pool.sort(key=lambda x: (-x[1], x[0]))
        pool = pool[:beam]
        done = [(g, s) for g, s, d in pool if d]
        live = [(g, s) for g, s, d in pool if not d]
    return done


# -- from decoded gaps to a template ---------------------------------------------------------------
def parse_spans(ids: list[int], sentinels: list[int]) -> list[list[int]] | None:
    """The spans of a T5 output `... <extra_id_0> X <extra_id_1> Y <extra_id_2> ...` ([X, Y] for
    three sentinels); None unless every sentinel appears, in order. Text before the first sentinel
    (the decoder's start token) and after the last (</s>, pads) is ignored."""
    at = []
    for s in sentinels:
        try:
            at.append(ids.index(s, at[-1] + 1 if at else 0))
        except ValueError:
            return None
    return [ids[a + 1:b] for a, b in zip(at, at[1:])]


def template_text(placement: str, fields, gaps: list[str], causal: bool) -> str:
    """The template a placement's gap texts make, e.g. after: "{sentence} X {mask} Y"."""
    esc = [g.strip().replace("{", "{{").replace("}", "}}") for g in gaps]
    slot = [esc[0], "{mask}", "."] if causal else [esc[0], "{mask}", esc[1]]
    f = ["{" + x + "}" for x in fields]
    parts = {"after": f + slot, "before": slot + f, "between": f[:1] + slot + f[1:]}[placement]
    return " ".join(p for p in parts if p)


def candidates_of(backbone, task, placement: str, generated: dict) -> list[dict]:
    """Candidate records of one placement's beam; `decoded` is what the model wrote for row 0."""
    tok, forced = backbone.tokenizer, generated["first_row"]["forced"]
    out = []
    for hyp in generated["beam"]:
        gaps = [list(g) for g in hyp["gaps"]]
        decoded = list(forced[0]) + [t for g, f in zip(gaps, forced[1:]) for t in g + list(f)]
        if generated["format"] == "spans":  # read T5's output as LM-BFF does
            gaps = parse_spans(decoded, [forced[0][-1], forced[1][0], forced[2][0]])
        shown = decoded[1:] if backbone.kind == "seq2seq" else decoded  # without the decoder's start token
        record = {"placement": placement, "decoded": tok.decode(shown), "log_likelihood": hyp["log_likelihood"]}
        if gaps is None:
            record.update(template=None, dropped="the output lacks a sentinel")
        else:
            texts = [tok.decode(g) for g in gaps]
            record["template"] = template_text(placement, task.fields, texts, backbone.kind == "causal")
        out.append(record)
    return out


def search(cfg, scorer, sdir, started: float) -> dict:
    s = cfg.search
    state = sdir.load_state()
    task, backbone = scorer.variant(), scorer.backbone
    train, dev = scorer.rows("train"), scorer.rows("dev")
    where = placements(s.get("placements"), backbone.kind, task.fields)
    generated = state.setdefault("generated", {})
    allowed = None
    for placement in where:  # stage 1: one summed beam per placement
        if placement in generated:
            continue
        t0 = time.perf_counter()
        fmt, progs = programs(backbone, task, train, placement, s.max_tokens)
        vocab = backbone.model.get_output_embeddings().weight.shape[0]
        allowed = free_tokens(backbone.tokenizer, vocab) if allowed is None else allowed
        step = Stepper(backbone, progs, scorer.batch_size)
        found = summed_beam(step, len(progs[0]["forced"]) - 1, s.beam, s.max_tokens, allowed)
        generated[placement] = {"format": fmt, "first_row": progs[0],
                                "beam": [{"gaps": [list(g) for g in gaps], "log_likelihood": ll} for gaps, ll in found]}
        state["wall_time_s"] = elapsed(state, started)
        started = time.perf_counter()
        sdir.save(state, [])
        log.info("template search: %s, %d hypotheses from %d rows (%.1f s)", placement, len(found), len(train),
                 time.perf_counter() - t0)
    if "candidates" not in state:
        cands, seen = [], set()
        for placement in where:
            for c in candidates_of(backbone, task, placement, generated[placement]):
                if c["template"] is None or c["template"] not in seen:
                    seen.add(c["template"])
                    cands.append(c)
        state["candidates"] = cands
        sdir.save(state, cands)
    candidates = state["candidates"]
    done = state.setdefault("dev_scored", 0)
    for i in range(done, len(candidates)):  # stage 2: zero-shot accuracy on the few-shot dev rows
        candidates[i]["dev_accuracy"] = None
        if candidates[i]["template"] is not None:
            try:
                candidates[i]["dev_accuracy"] = scorer.accuracy(scorer.variant(template=candidates[i]["template"]), dev)
            except PtuneError as e:  # a template the task refuses (e.g. no room within task.max_len)
                candidates[i]["dropped"] = str(e)
        state["dev_scored"] = i + 1
        if (i + 1) % SAVE_EVERY == 0 or i + 1 == len(candidates):
            state["wall_time_s"] = elapsed(state, started)
            started = time.perf_counter()
            sdir.save(state, candidates)
    scored = [i for i, c in enumerate(candidates) if c.get("dev_accuracy") is not None]
    if not scored:
        why = candidates[0]["dropped"] if candidates else "the beam found no hypothesis"
        raise PtuneError(f"ptune search template: no candidate template could be scored ({why})")
    top = min(scored, key=lambda i: (-candidates[i]["dev_accuracy"], -candidates[i]["log_likelihood"], i))
    best_c = candidates[top]
    found = {"template": best_c["template"],
             "verbalizer": {label: list(ws) for label, ws in zip(task.labels, task.verbalizer)}}
    best = {"split": "dev", "accuracy": best_c["dev_accuracy"], "log_likelihood": best_c["log_likelihood"],
            "placement": best_c["placement"], "rank": top}
    summary = finish(sdir, cfg, "template", found, best, len(scored), elapsed(state, started))
    return {**summary, "dir": str(sdir.path), "overrides": sdir.overrides.read_text().strip()}
