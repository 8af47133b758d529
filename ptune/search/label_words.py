"""Automatic label words: LM-BFF, Gao, Fisch & Chen 2021, "Making Pre-trained Language Models Better
Few-shot Learners", §5.1 (their tools/generate_labels.py).

For the task's template (manual or searched), on the few-shot training rows:
1. per class c, the top `search.k` candidate words v by sum over c's rows of log P({mask} = v | T(x));
2. every assignment of one candidate per class (distinct words) is scored by its zero-shot accuracy
   on the few-shot training rows; the best `search.n` are kept;
3. those n are scored zero-shot on the few-shot dev rows; the best (dev accuracy, then train
   accuracy) is the result.

Candidates: by default every vocabulary token that is a whole alphabetic word after the template's
whitespace before {mask} (it tokenizes back to itself: " great" on byte-level BPE, "great" on
WordPiece), as LM-BFF filters RoBERTa's vocabulary. With `search.words=<file>` (one word per line),
those words are the candidates and each is scored by all its pieces (ptune.heads.verbalizer's teacher-
forced sum), so words the tokenizer splits take part.

What differs from LM-BFF: their step 3 fine-tunes each of the n assignments and re-ranks by dev
accuracy after training; here step 3 is zero-shot (nothing trained), and the n assignments with
their scores are all in candidates.jsonl for a user who wants to fine-tune several
(`ptune train -m` over them).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from ptune.data import collate
from ptune.errors import PtuneError
from ptune.heads.verbalizer import VerbalizerHead, whole_words, word_pieces
from ptune.search.base import elapsed, finish

log = logging.getLogger("ptune")

MAX_ASSIGNMENTS = 20_000_000  # k ** n_classes above this: lower search.k


def check(cfg) -> None:
    s = cfg.search
    for key, low in (("k", 1), ("n", 1)):
        v = s.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise PtuneError(f"search.{key}={v!r} is invalid: must be an integer >= {low}")
    if s.get("words") is not None and not isinstance(s.words, str):
        raise PtuneError(f"search.words={s.words!r} must be a file path (one candidate word per line) or null")
    if cfg.task.get("few_shot") is None:
        raise PtuneError("ptune search label-words searches on the few-shot protocol's rows: set task.few_shot=K "
                         "(e.g. 16) and task.few_shot_seed")
    n_classes = len(cfg.task.verbalizer or {}) or 2
    if s.k ** n_classes > MAX_ASSIGNMENTS:
        raise PtuneError(f"search.k={s.k} gives {s.k}^{n_classes} assignments to score; lower search.k")


def read_words(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise PtuneError(f"search.words={path}: no such file (one candidate word per line)")
    try:
        words = [w.strip() for w in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise PtuneError(f"search.words={path} is not UTF-8 text") from None
    words = list(dict.fromkeys(w for w in words if w and not w.startswith("#")))
    if len(words) < 2:
        raise PtuneError(f"search.words={path} lists {len(words)} word(s); give at least one per class")
    return words


def candidate_scores(scorer, task, rows, words_file):
    """(words, (len(rows), n_words) log P(word at {mask} | row)). Vocabulary scan: single tokens
    from one forward per row; a word file: every word by all its pieces."""
    tok = scorer.backbone.tokenizer
    if words_file is None:
        vocab = whole_words(tok, task.template.mask_space)
        logp = scorer.mask_log_probs(task, rows)
        return [w for w, _ in vocab], logp[:, torch.tensor([t for _, t in vocab])]

    words = read_words(words_file)
    pieces = [[word_pieces(tok, w, task.template.mask_space, f"search.words ({words_file})")] for w in words]
    head = VerbalizerHead(scorer.backbone, pieces)  # one "class" per word: its score is log P(word)
    examples = task.examples(tok, rows)
    out = []
    with torch.no_grad():
        for s in range(0, len(examples), scorer.batch_size):
            out.append(head.scores(scorer.method, collate(examples[s:s + scorer.batch_size], tok.pad_token_id)).float().cpu())
    return words, torch.cat(out)


def assignment_accuracy(logp: torch.Tensor, labels: torch.Tensor, per_class: list[list[int]], n: int):
    """The n best assignments (one column of logp per class, all distinct) by accuracy on the rows:
    [(accuracy, (column per class))], best first; ties keep the order of the candidates' ranks."""
    n_classes = len(per_class)
    k = [len(c) for c in per_class]
    total = math.prod(k)
    best: list[tuple[float, int]] = []
    chunk = 200_000
    cols = [torch.tensor(c) for c in per_class]
    for start in range(0, total, chunk):
        idx = torch.arange(start, min(total, start + chunk))
        digits, rest = [], idx.clone()
        for c in reversed(range(n_classes)):  # mixed-radix digits: class 0 varies slowest
            digits.append(rest % k[c])
            rest = rest // k[c]
        digits = digits[::-1]
        chosen = torch.stack([cols[c][digits[c]] for c in range(n_classes)], 1)  # (m, n_classes) columns
        distinct = torch.ones(len(idx), dtype=torch.bool)
        for a in range(n_classes):
            for b in range(a + 1, n_classes):
                distinct &= chosen[:, a] != chosen[:, b]
        scores = logp[:, chosen]  # (rows, m, n_classes)
        acc = (scores.argmax(-1) == labels[:, None]).float().mean(0)
        acc[~distinct] = -1.0
        top = torch.argsort(-acc, stable=True)[:n]  # ties in candidate order (rank of class 0's word first)
        best += [(float(acc[i]), int(idx[i])) for i in top if acc[i] >= 0]
        best.sort(key=lambda x: (-x[0], x[1]))
        best = best[:n]
    out = []
    for a, flat in best:
        digits, rest = [], flat
        for c in reversed(range(n_classes)):
            digits.append(rest % k[c])
            rest //= k[c]
        out.append((a, tuple(per_class[c][d] for c, d in enumerate(reversed(digits)))))
    return out


def search(cfg, scorer, sdir, started: float) -> dict:
    s = cfg.search
    state = sdir.load_state()
    task = scorer.variant()
    labels_names = list(task.labels)
    train, dev = scorer.rows("train"), scorer.rows("dev")
    if "per_class" not in state:  # stage 1: top-k words per class
        t0 = time.perf_counter()
        words, logp = candidate_scores(scorer, task, train, s.get("words"))
        y = torch.tensor([r["label"] for r in train])
        per_class = []
        for c in range(len(labels_names)):
            total = logp[y == c].sum(0)
            per_class.append(torch.topk(total, min(s.k, len(words))).indices.tolist())
        keep = sorted({i for c in per_class for i in c})
        state.update(words=[words[i] for i in keep], per_class=[[keep.index(i) for i in c] for c in per_class],
                     train_logp=logp[:, keep].tolist(), stage="top-k")
        state["wall_time_s"] = elapsed(state, started)
        started = time.perf_counter()
        sdir.save(state, [])
        log.info("label words: %d candidates per class from %d rows (%.1f s)", s.k, len(train), time.perf_counter() - t0)
    words = state["words"]
    if "assignments" not in state:  # stage 2: assignments by zero-shot accuracy on the training rows
        logp = torch.tensor(state["train_logp"])
        y = torch.tensor([r["label"] for r in train])
        best = assignment_accuracy(logp, y, state["per_class"], s.n)
        state["assignments"] = [{"words": [words[i] for i in cols], "train_accuracy": a} for a, cols in best]
        state["wall_time_s"] = elapsed(state, started)
        started = time.perf_counter()
        sdir.save(state, state["assignments"])
    candidates = state["assignments"]
    done = state.setdefault("dev_scored", 0)
    for i in range(done, len(candidates)):  # stage 3: the n kept, zero-shot on the few-shot dev rows
        verbalizer = dict(zip(labels_names, [[w] for w in candidates[i]["words"]]))
        candidates[i]["dev_accuracy"] = scorer.accuracy(scorer.variant(verbalizer=verbalizer), dev)
        state["dev_scored"] = i + 1
        if (i + 1) % 10 == 0 or i + 1 == len(candidates):
            state["wall_time_s"] = elapsed(state, started)
            started = time.perf_counter()
            sdir.save(state, candidates)
    ranked = sorted(range(len(candidates)), key=lambda i: (-candidates[i]["dev_accuracy"],
                                                           -candidates[i]["train_accuracy"], i))
    top = candidates[ranked[0]]
    found = {"verbalizer": {label: [w] for label, w in zip(labels_names, top["words"])}}
    if cfg.task.get("template") is not None:
        found = {"template": cfg.task.template, **found}
    best = {"split": "dev", "accuracy": top["dev_accuracy"], "train_accuracy": top["train_accuracy"],
            "rank": ranked[0]}
    summary = finish(sdir, cfg, "label-words", found, best, len(candidates), elapsed(state, started))
    return {**summary, "dir": str(sdir.path), "overrides": sdir.overrides.read_text().strip()}
