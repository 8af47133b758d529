"""The knowledgeable verbalizer — Hu, Ding, Wang, Liu, Wang, Li, Wu & Sun 2022, "Knowledgeable
Prompt-tuning: Incorporating Knowledge into Prompt Verbalizer for Text Classification" (KPT;
`task.head=knowledgeable`).

A class is read through many label words instead of one or two. The words, per class:

1. expanded: the manual words (`task.verbalizer`), then the related words of `task.kpt_words` (a
   YAML or JSON file {label: [word, ...]}, the knowledge base's words), then the `task.kpt_neighbours`
   whole-word tokens nearest to the manual words by cosine of the backbone's input embeddings (the
   paper queries related-words sites and sentiment lexicons; none is reachable offline, so the
   backbone's own embedding neighbours stand in). A word is identified by its pieces after the
   template's whitespace before {mask}; one that lands in two classes is dropped from both, unless it
   is a manual word of one (then it stays there only, as OpenPrompt's `delete_common_words`); words the
   tokenizer cannot write (unknown token) are dropped from the file's lists.
2. refined on unlabelled rows: the first `task.kpt_prior_rows` of the task's training rows (a seeded
   subset, `task.subsample_seed`; labels never read), scored by the method being trained, as built
   (zero-shot: the frozen LM with the template; trained methods: their initial state, as the
   paper's code calibrates before tuning). With log P(v | x_i) the whole word's log-probability at
   {mask} (multi-piece words teacher-forced, verbalizer.py):
   - frequency refinement: the contextualized prior P_D(v) = 1/M sum_i P(v | x_i); a word with
     P_D(v) < `task.kpt_threshold` is removed;
   - relevance refinement (`task.kpt_relevance`, a minimum score R): with q_v = the column of
     log P(v | x_i) over the M rows, centred (minus its mean), q_y = the mean of class y's manual
     words' q, r(v, y) = cos(q_v, q_y) and, for v of class f(v),
         R(v) = r(v, f(v)) / ( (1/(C-1) sum_{y != f(v)} |r(v, y)|^p) ^ (1/p) ),  p = 10 / (C - 2 + 0.01) + 1
     (the authors' tfidf_filter; for two classes R = r(v, own) / |r(v, other)|), R = -inf where
     r(v, f(v)) <= 0; words with R(v) < task.kpt_relevance are removed.
   Manual words are never removed: they are the class's declared words (and the q_y above).
3. scored: s(v | x) = log P(v | x) - log P_D(v) with `task.kpt_calibrate` (the paper's contextualized
   calibration, dividing by the prior), log P(v | x) without; the class score is
       mean:      1/|V_y| sum_{v in V_y} s(v | x)                   (`task.kpt_aggregate=mean`)
       weighted:  sum_{v in V_y} softmax_y(w)_v s(v | x),  w trained from 0 (the paper's learnable refinement)
   and training is cross-entropy over the class scores, as every verbalizer head.

The refined lists, their priors and what was removed (and why) are computed once, when the head is
built for training (ptune.build.attach_head), and saved in adapter_config.json (`head`): `ptune
eval`, `predict`, `serve`, mixed batches and ensembles rebuild the head from there and never
recompute them (ptune.build.load_trained); a run evaluated with other task.kpt_* values or manual
words is refused in one line. `weighted` saves w as head.word_weights (n_words,).

Differences from the paper and its code: the prior is the mean of probabilities (the paper's
definition; OpenPrompt registers the mean of the logits and renormalises over the label words:
a renormalisation shifts every word of a row by one constant, which changes no class's softmax,
as s is averaged with weights summing to 1). Frequency refinement uses a probability threshold where
the code drops words with a piece in the lower half of the vocabulary by prior; relevance keeps
R >= a threshold where the code picks one cut rate for all classes so that boundary scores are near 1;
both use log-probabilities of whole words (the code: the first piece's logit); manual words always stay.
The zero-shot "mean" averages log-probabilities as the code does (the paper writes a mean of
probabilities). The paper applies relevance refinement zero-shot; it reads unlabelled rows only, so
here it runs with any method.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path

import torch
import yaml
from torch import nn

from ptune.data import collate, subsample
from ptune.errors import PtuneError
from ptune.heads.verbalizer import VerbalizerHead, whole_words, word_pieces

log = logging.getLogger("ptune")

AGGREGATES = ("mean", "weighted")
KEYS = ("kpt_words", "kpt_neighbours", "kpt_prior_rows", "kpt_threshold", "kpt_relevance", "kpt_calibrate",
            "kpt_aggregate")
PRIOR_BATCH = 16  # rows per forward when the prior is computed


def check_options(values: dict, task) -> dict:
    """One-line refusals for the task.kpt_* keys (`values`, by key); {key: checked value}."""
    words, neighbours, prior_rows, threshold, relevance, calibrate, aggregate = (values[k] for k in KEYS)
    if words is not None and not (isinstance(words, str) and words.strip()):
        raise PtuneError(f"task.kpt_words={words!r} must be a .yaml/.yml/.json file of {{label: [words]}} or null")
    for key, value, low in (("kpt_neighbours", neighbours, 0), ("kpt_prior_rows", prior_rows, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 100_000:
            raise PtuneError(f"task.{key}={value!r} is invalid: an integer from {low} to 100,000")
    for key, value in (("kpt_threshold", threshold), ("kpt_relevance", relevance)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise PtuneError(f"task.{key}={value!r} is invalid: a number, or null to skip that refinement")
    if not isinstance(calibrate, bool):
        raise PtuneError(f"task.kpt_calibrate={calibrate!r} is invalid: write true or false")
    if aggregate not in AGGREGATES:
        raise PtuneError(f"task.kpt_aggregate={aggregate!r} is not one of {', '.join(AGGREGATES)}")
    return dict(zip(KEYS, (words, neighbours, prior_rows, threshold, relevance, calibrate, aggregate)))


def read_related(path: str, labels: list[str]) -> list[list[str]]:
    """task.kpt_words: per label (in class order) its related words from a YAML/JSON {label: [words]}."""
    p = Path(path).expanduser()
    if p.suffix.lower() not in (".yaml", ".yml", ".json") or not p.is_file():
        raise PtuneError(f"task.kpt_words={path}: {'no such file' if not p.is_file() else 'not .yaml/.yml/.json'}; "
                         f"give a file of {{label: [related words]}}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))  # JSON is YAML
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise PtuneError(f"task.kpt_words={path} is not valid YAML/JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not raw:
        raise PtuneError(f"task.kpt_words={path} must hold a mapping {{label: [related words]}}")
    raw = {str(k): v for k, v in raw.items()}
    extra = [k for k in raw if k not in labels]
    if extra:
        raise PtuneError(f"task.kpt_words={path} names the label {extra[0]!r}, not one of {', '.join(labels)}")
    out = []
    for label in labels:
        words = raw.get(label) or []
        words = [words] if isinstance(words, str) else words
        if not isinstance(words, list) or not all(isinstance(w, (str, int, float)) for w in words):
            raise PtuneError(f"task.kpt_words={path}: {label} must list words (strings)")
        out.append([str(w).strip() for w in words if str(w).strip()])
    return out


def merge(manual: list[list[tuple]], *sources: list[list[tuple]]) -> list[list[tuple]]:
    """Per class its words (any hashable: pieces, or (pieces, text, source)) keyed by `key` = item[0]:
    manual first, then each source in order, each word once per class; a word of several classes
    stays only where it is manual, else nowhere."""
    classes = [list(ws) for ws in manual]
    for source in sources:
        for c, ws in enumerate(source):
            classes[c] += ws
    manual_of = {w[0]: c for c, ws in enumerate(manual) for w in ws}
    owners: dict = {}
    for c, ws in enumerate(classes):
        for w in ws:
            owners.setdefault(w[0], set()).add(c)
    out = []
    for c, ws in enumerate(classes):
        seen, keep = set(), []
        for w in ws:
            shared = len(owners[w[0]]) > 1
            if w[0] in seen or (shared and manual_of.get(w[0]) != c):
                continue
            seen.add(w[0])
            keep.append(w)
        out.append(keep)
    return out


@functools.lru_cache(maxsize=4)
def _whole_words(tokenizer, space: str) -> tuple:
    return tuple(whole_words(tokenizer, space))


def neighbours(backbone, manual: list[list[tuple[int, ...]]], space: str, n: int) -> list[list[str]]:
    """Per class the n whole-word tokens (after `space`) nearest to its manual words: the largest
    max over the class's words u of cos(e_t, e_u), e = input embeddings (a word of several pieces:
    their mean); the manual words themselves excluded, ties to the lower token id."""
    if n == 0:
        return [[] for _ in manual]
    vocab = _whole_words(backbone.tokenizer, space)
    taken = {w for ws in manual for w in ws}
    vocab = [(w, t) for w, t in vocab if (t,) not in taken]
    table = backbone.model.get_input_embeddings().weight.detach().float().cpu()  # (vocab, d)
    cand = torch.nn.functional.normalize(table[torch.tensor([t for _, t in vocab])], dim=-1)  # (n_cand, d)
    out = []
    for ws in manual:
        anchors = torch.nn.functional.normalize(torch.stack([table[list(w)].mean(0) for w in ws]), dim=-1)
        sims = (cand @ anchors.T).max(-1).values  # (n_cand,)
        order = torch.sort(sims, descending=True, stable=True).indices[:n]
        out.append([vocab[i][0] for i in order.tolist()])
    return out


def word_log_probs(method, task, words: list[tuple[int, ...]], rows: list[dict]) -> torch.Tensor:
    """(len(rows), len(words)) log P(word at {mask} | row) under `method`, in eval mode, no grad."""
    tok = method.backbone.tokenizer
    scorer = VerbalizerHead(method.backbone, [[w] for w in words])  # one "class" per word: log P(word)
    examples = task.examples(tok, [{**r, "label": 0} for r in rows])
    modes = [(m, m.training) for m in (method, method.backbone.model)]
    out = []
    try:
        for m, _ in modes:
            m.eval()
        with torch.no_grad():
            for s in range(0, len(examples), PRIOR_BATCH):
                out.append(scorer.scores(method, collate(examples[s:s + PRIOR_BATCH], tok.pad_token_id)).float().cpu())
    finally:
        for m, was in modes:
            m.train(was)
    return torch.cat(out)


def log_prior(logp: torch.Tensor) -> torch.Tensor:
    """(M, n) log P(v | x_i) -> (n,) log P_D(v) = log of the mean probability over the M rows."""
    return torch.logsumexp(logp, 0) - math.log(logp.shape[0])


def relevance(logp: torch.Tensor, owner: list[int], manual: list[bool], n_classes: int) -> torch.Tensor:
    """(n,) R(v) (module docstring) from (M, n) log-probs; owner[v]: v's class; manual[v]: a manual word."""
    q = logp - logp.mean(0, keepdim=True)  # (M, n): each word's centred column
    owner_t, manual_t = torch.tensor(owner), torch.tensor(manual)
    classes = torch.stack([q[:, (owner_t == c) & manual_t].mean(1) for c in range(n_classes)], 1)  # (M, C)
    r = torch.nn.functional.cosine_similarity(q.T[:, None, :], classes.T[None, :, :], dim=-1)  # (n, C)
    p = 10 / (n_classes - 2 + 0.01) + 1
    own = r[torch.arange(len(owner)), owner_t]
    others = r.abs().masked_fill(torch.nn.functional.one_hot(owner_t, n_classes).bool(), 0.0)
    # the power mean scaled by its largest term: |r|^p underflows to 0 at p ~ 1000 (two classes)
    top = others.amax(-1, keepdim=True).clamp_min(1e-30)
    denom = top.squeeze(-1) * ((others / top).pow(p).sum(-1) / (n_classes - 1)).pow(1 / p)
    out = own / denom
    return out.masked_fill(own <= 0, float("-inf"))


class KnowledgeableHead(VerbalizerHead):
    """Class scores from a class's refined words (module docstring). words: per class its words'
    piece ids; texts, sources: the same as text and where each came from (manual, file, neighbour);
    log_priors: per class each word's log P_D(v) (None: no calibration); record: what adapter_config.json
    keeps beside the words (settings, removed words, prior rows)."""

    def __init__(self, backbone, words, labels, *, texts, sources, log_priors, aggregate: str, record: dict,
                 template=None, triggers=None):
        super().__init__(backbone, words, labels, template=template, triggers=triggers)
        self.texts, self.sources, self.aggregate, self.record = texts, sources, aggregate, record
        self.log_priors = log_priors
        n = [len(ws) for ws in words]
        prior = [v for ps in log_priors for v in ps] if log_priors is not None else [0.0] * sum(n)
        self._prior = torch.tensor(prior)  # (n_words,) in class order; not a tensor of the adapter
        self._spans = [(sum(n[:c]), sum(n[:c + 1])) for c in range(len(n))]  # class c's words in that order
        self._cand_of = torch.tensor([i for ix in self.class_cands for i in ix])  # word -> candidate index
        if aggregate == "weighted":
            self.word_weights = nn.Parameter(torch.zeros(sum(n)))  # head.word_weights: softmax within a class

    def class_scores(self, pieces: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """(n_classes,) from one example's [(candidate, log-prob of one of its pieces)]: the (weighted)
        mean over a class's words of s(v | x) = log P(v | x) [- log P_D(v)]."""
        device = pieces[0][1].device
        word = [torch.zeros((), device=device) for _ in self.cands]
        for c, v in pieces:
            word[c] = word[c] + v
        s = torch.stack(word)[self._cand_of.to(device)] - self._prior.to(device)  # (n_words,)
        if self.aggregate == "weighted":
            return torch.stack([(torch.softmax(self.word_weights[lo:hi].to(device), 0) * s[lo:hi]).sum()
                                for lo, hi in self._spans])
        return torch.stack([s[lo:hi].mean() for lo, hi in self._spans])

    def config(self) -> dict:
        return {"kind": "knowledgeable", "labels": self.labels, "words": self.texts, "sources": self.sources,
                "word_pieces": [[list(w) for w in ws] for ws in self.words], "log_prior": self.log_priors,
                "aggregate": self.aggregate,
                "combine": ("class score = " + ("mean" if self.aggregate == "mean" else "softmax(head.word_weights)-"
                            "weighted mean") + " over the class's words of log P(word)"
                            + (" - log prior(word)" if self.log_priors is not None else "")),
                **({"tensors": "head.word_weights (n_words,), softmax within each class"}
                   if self.aggregate == "weighted" else {}),
                **self.record, **self.prompt}


def _expanded(task, backbone, settings: dict) -> list[list[tuple]]:
    """Per class [(pieces, text, source)]: manual, file, neighbour words, merged (module docstring)."""
    tok, space, labels = backbone.tokenizer, task.template.mask_space, list(task.labels)
    manual = [[(word_pieces(tok, w, space, f"task.verbalizer.{label}"), w, "manual") for w in ws]
              for label, ws in zip(labels, task.verbalizer)]
    related, dropped = [[] for _ in labels], 0
    if settings["kpt_words"] is not None:
        for c, ws in enumerate(read_related(settings["kpt_words"], labels)):
            for w in ws:
                try:
                    related[c].append((word_pieces(tok, w, space, "task.kpt_words"), w, "file"))
                except PtuneError:
                    dropped += 1
    if dropped:
        log.info("task.kpt_words: %d word(s) the tokenizer cannot write (unknown token) left out", dropped)
    near = neighbours(backbone, [[w[0] for w in ws] for ws in manual], space, settings["kpt_neighbours"])
    near = [[(word_pieces(tok, w, space, "task.kpt_neighbours"), w, "neighbour") for w in ws] for ws in near]
    return merge(manual, related, near)


def refine(task, method, classes: list[list[tuple]], settings: dict) -> tuple[list[list[tuple]], list | None, dict]:
    """Frequency and relevance refinement on the prior rows: (kept words per class, their log priors
    per class or None, the record for adapter_config.json)."""
    rows = task.training_rows()
    rows = [rows[i] for i in subsample(len(rows), settings["kpt_prior_rows"], task.subsample_seed)]
    flat = [(c, w) for c, ws in enumerate(classes) for w in ws]
    record = {"settings": settings, "prior_rows": len(rows), "removed": []}
    needs_prior = settings["kpt_threshold"] is not None or settings["kpt_relevance"] is not None or \
        settings["kpt_calibrate"]
    if not needs_prior:
        return classes, None, {**record, "prior_rows": 0}
    if settings["kpt_relevance"] is not None and len(rows) < 2:
        raise PtuneError(f"task.kpt_relevance compares words over the prior rows, and {len(rows)} training row is "
                         f"there; raise task.kpt_prior_rows (and the training rows) or set task.kpt_relevance=null")
    logp = word_log_probs(method, task, [w[0] for _, w in flat], rows)  # (M, n_words)
    prior = log_prior(logp)
    keep = [True] * len(flat)
    manual = [w[2] == "manual" for _, w in flat]
    if settings["kpt_threshold"] is not None:
        floor = math.log(settings["kpt_threshold"]) if settings["kpt_threshold"] > 0 else float("-inf")
        for i, ((c, w), lp) in enumerate(zip(flat, prior.tolist())):
            if not manual[i] and lp < floor:
                keep[i] = False
                record["removed"].append({"label": task.labels[c], "word": w[1], "by": "frequency",
                                          "prior": math.exp(lp)})
    if settings["kpt_relevance"] is not None:
        idx = [i for i in range(len(flat)) if keep[i]]
        score = relevance(logp[:, idx], [flat[i][0] for i in idx], [manual[i] for i in idx], len(classes))
        for i, r in zip(idx, score.tolist()):
            if not manual[i] and r < settings["kpt_relevance"]:
                keep[i] = False
                record["removed"].append({"label": task.labels[flat[i][0]], "word": flat[i][1][1], "by": "relevance",
                                          "relevance": r if math.isfinite(r) else None})
    kept = [[w for (c2, w), k in zip(flat, keep) if k and c2 == c] for c in range(len(classes))]
    priors = [[lp for (c2, _), lp, k in zip(flat, prior.tolist(), keep) if k and c2 == c] for c in range(len(classes))]
    log.info("knowledgeable verbalizer: %s words per class after refinement on %d rows (%d removed)",
             "/".join(str(len(ws)) for ws in kept), len(rows), len(record["removed"]))
    return kept, (priors if settings["kpt_calibrate"] else None), record


def build(task, backbone, method, seed: int, saved: dict | None) -> KnowledgeableHead:
    """The head for `task` (task.head=knowledgeable): from the adapter's saved head config when one is
    given (inference), else expanded and refined now (training; module docstring)."""
    settings = {**task.head_options, "verbalizer": dict(zip(task.labels, task.verbalizer))}
    prompt = {"template": task.template.source, "triggers": task.triggers}
    if settings["kpt_aggregate"] == "weighted" and not method.trains:  # before any refinement is computed
        raise PtuneError(f"task.kpt_aggregate=weighted trains a weight per label word, and method={method.name} trains "
                         f"nothing; zero-shot KPT is task.kpt_aggregate=mean (or train the weights alone: "
                         f"method=fine-tune method.trainable=head)")
    if saved is not None:
        return restore(backbone, saved, settings, list(task.labels), prompt)
    classes = _expanded(task, backbone, settings)
    kept, priors, record = refine(task, method, classes, settings)
    return KnowledgeableHead(backbone, [[w[0] for w in ws] for ws in kept], list(task.labels),
                             texts=[[w[1] for w in ws] for ws in kept], sources=[[w[2] for w in ws] for ws in kept],
                             log_priors=priors, aggregate=settings["kpt_aggregate"], record=record, **prompt)


MAX_SAVED_WORDS = 10_000  # per class, in an adapter's saved list (untrusted input: bounded before anything is built)


def restore(backbone, saved: dict, settings: dict, labels: list[str], prompt: dict) -> KnowledgeableHead:
    """The head as saved in adapter_config.json; one PtuneError line when the run's config now asks for
    another refinement (its word list would not be the one trained) or the saved list is malformed."""
    if saved.get("kind") != "knowledgeable":
        raise PtuneError(f"the adapter holds a {saved.get('kind')} head and task.head=knowledgeable needs the refined "
                         f"word list a knowledgeable run saves; evaluate it with the task.head it was trained with")
    before = saved.get("settings") or {}
    for key, value in settings.items():
        if json.dumps(before.get(key), sort_keys=True) != json.dumps(value, sort_keys=True):
            name = "task.verbalizer" if key == "verbalizer" else f"task.{key}"
            raise PtuneError(f"the adapter's knowledgeable word list was refined with {name}={before.get(key)!r} "
                             f"and this config says {value!r}; the saved list is what the run trained with: drop the "
                             f"override, or train a new run to refine it otherwise")
    vocab = len(backbone.tokenizer)
    pieces, priors = saved.get("word_pieces"), saved.get("log_prior")
    ok = (isinstance(pieces, list) and len(pieces) == len(labels) and all(isinstance(ws, list) and ws for ws in pieces)
          and all(isinstance(w, list) and w and all(isinstance(t, int) and 0 <= t < vocab for t in w)
                  for ws in pieces for w in ws)
          and all(len(ws) <= MAX_SAVED_WORDS for ws in pieces) and all(len(w) <= 64 for ws in pieces for w in ws)
          and (priors is None or (isinstance(priors, list) and all(isinstance(p, list) for p in priors)
                                  and [len(p) for p in priors] == [len(ws) for ws in pieces]
                                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                          for p in priors for v in p))))
    if not ok:
        raise PtuneError("adapter_config.json's knowledgeable head has no valid word_pieces / log_prior lists "
                         "(edited, or not ptune's); retrain the run")
    words = [[tuple(w) for w in ws] for ws in pieces]
    record = {k: saved.get(k) for k in ("settings", "prior_rows", "removed")}
    return KnowledgeableHead(backbone, words, labels, texts=saved.get("words"), sources=saved.get("sources"),
                             log_priors=priors, aggregate=settings["kpt_aggregate"], record=record, **prompt)
