"""In-context demonstrations of LM-BFF (Gao, Fisch & Chen 2021, "Making Pre-trained Language Models
Better Few-shot Learners", §6; their src/dataset.py) for every classification task.

`task.demonstrations=random|similar` (verbalizer head only): each input is read together with one
training row per class, written in the task's own template with {mask} replaced by that class's
(first) label word, in class order:

    masked, seq2seq:  "{sentence} It was {mask} . <demo 0> It was terrible . <demo 1> It was great ."
    causal:           "<demo 0> It was terrible . <demo 1> It was great . {sentence} It was {mask} ."

LM-BFF appends the demonstrations after the query; a causal model reads only what precedes {mask}
(ptune.heads.verbalizer), so there they come first, as GPT-3's few-shot prompts. A demonstration copies
the template's words, fields and label word; {soft} (and any other method) slots stay in the query
alone, so p-tuning's prompt positions are not multiplied. The whole row is one template
(`Demonstrations.template`): the encoder's truncation cuts its fields, the query's and the
demonstrations', longest first, within task.max_len; the words, the mask and the special tokens are
never cut (too many of them: one line naming task.max_len).

Which rows: the task's training rows (the few-shot train set under task.few_shot, else the
max_train_samples subset or the whole split); a training example never demonstrates itself (its
own class draws from the others). `random`: uniformly among a class's rows. `similar` (LM-BFF's
"demo_filter", rate 0.5): uniformly among the most similar half (at least one) of a class's rows,
by cosine similarity of sentence embeddings: the mean over tokens of the last hidden states of
`task.demo_encoder` (a conf/model name; minilm = sentence-transformers' all-MiniLM-L6-v2, whose
pooling this is, inputs cut at 256 tokens), the template's fields joined by spaces. Each text is
embedded once and cached.

Determinism: the set of input x, set s is drawn by random.Random(f"{seed}/{key(x)}/{s}"), seed =
task.few_shot_seed under task.few_shot (else task.subsample_seed), key(x) a digest of x's template
fields. So an input gets the same demonstrations wherever it sits (a dev file, `ptune predict`, a
mixed-adapter batch), training examples are the same on resume, and evaluation is reproducible.

Where ptune differs from LM-BFF: training examples are drawn once (set 0) and kept for every
epoch, where LM-BFF resamples each epoch (ptune's data plan is a pure function of the step and the
examples are built once); no separator token between the query and the demonstrations (LM-BFF's
templates end each sentence with *sep+*); the similarity encoder is MiniLM, not their SBERT
RoBERTa-large; truncation is the template encoder's one rule (LM-BFF limits each sentence).
At inference `task.demo_sets=N` scores every row with sets 0..N-1 and averages the class scores
(LM-BFF: 16 sets, averaged logits); ptune's default is 1.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random

import torch

from ptune import config, models
from ptune.errors import PtuneError
from ptune.tasks.templates import Template

MODES = ("random", "similar")
FILTER_RATE = 0.5  # LM-BFF's demo_filter_rate: sample among the top half by similarity
MAX_SETS = 1000
ENCODER_MAX_TOKENS = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2


def check(mode, sets, encoder, head, default_encoder) -> None:
    """One-line refusals for the task.demonstrations / demo_sets / demo_encoder keys under the head `head`
    (a ptune.heads.HeadKind); `default_encoder`: the task file's demo_encoder."""
    if mode is not None and mode not in MODES:
        raise PtuneError(f"task.demonstrations={mode!r} is not one of null, {', '.join(MODES)}")
    if isinstance(sets, bool) or not isinstance(sets, int) or not 1 <= sets <= MAX_SETS:
        raise PtuneError(f"task.demo_sets={sets!r} is invalid: the number of demonstration sets each evaluated row is "
                         f"scored with, an integer from 1 to {MAX_SETS:,} (LM-BFF: 16)")
    if mode != "similar" and encoder != default_encoder:
        raise PtuneError(f"task.demo_encoder={encoder} chooses demonstrations by similarity, and "
                         f"task.demonstrations={'null' if mode is None else mode} does not; set "
                         f"task.demonstrations=similar, or leave task.demo_encoder={default_encoder}")
    if mode is None:
        if sets != 1:
            raise PtuneError(f"task.demo_sets={sets} averages over demonstration sets and task.demonstrations=null "
                             f"draws none; set task.demonstrations=random or similar, or task.demo_sets=1")
        return
    if not head.demonstrations:
        raise PtuneError(f"task.demonstrations={mode} writes each class's label word at the template's {{mask}}, for "
                         f"the label-word head; task.head={head.name}: use task.head=verbalizer, or "
                         f"task.demonstrations=null")
    if mode == "similar" and (not isinstance(encoder, str) or not encoder):
        raise PtuneError(f"task.demo_encoder={encoder!r}: task.demonstrations=similar needs a sentence encoder, a "
                         f"model config name such as minilm")


@functools.lru_cache(maxsize=2)
def load_encoder(name: str):
    """The frozen Backbone of conf/model/<name>.yaml, loaded once per process; one PtuneError line
    when it is not a model config or cannot be loaded."""
    if name not in config.options("model"):
        raise PtuneError(f"task.demo_encoder={name!r} is not a model config; choose one of "
                         f"{', '.join(config.options('model'))} (conf/model/*.yaml)")
    spec = config.group_defaults("model", name)
    try:
        return models.load(name, spec["kind"], spec["source"], spec.get("name_or_path"), spec.get("tiny"),
                           spec.get("tokenizer"), seed=spec.get("init_seed", 0),
                           trust_remote_code=spec.get("trust_remote_code", False))
    except PtuneError as e:
        raise PtuneError(f"task.demo_encoder={name} cannot be loaded for task.demonstrations=similar: {e}") from None
    except Exception as e:  # OSError, a broken model folder: still one line
        first = (str(e).splitlines() or [""])[0]
        raise PtuneError(f"task.demo_encoder={name} cannot be loaded for task.demonstrations=similar "
                         f"({type(e).__name__}: {first}); choose another model config or "
                         f"task.demonstrations=random") from None


@torch.no_grad()
def embed(backbone, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """(len(texts), hidden) unit vectors: the attention-masked mean of the last hidden states."""
    tok, model = backbone.tokenizer, backbone.model
    body = model.get_encoder() if backbone.kind == "seq2seq" else model.base_model
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(texts), batch_size):
        enc = tok(texts[s:s + batch_size], padding=True, truncation=True, max_length=ENCODER_MAX_TOKENS,
                  return_tensors="pt")
        mask = enc["attention_mask"].to(device)
        hidden = body(input_ids=enc["input_ids"].to(device), attention_mask=mask).last_hidden_state  # (b, seq, hidden)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(mean.float(), dim=-1).cpu())
    return torch.cat(out)


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def demo_source(template: Template, word: str, c: int) -> str:
    """Template source of class c's demonstration: the template's words, its fields renamed
    _demo<c>_<field>, `word` at {mask}; soft (and other method) slots left out."""
    out = []
    for p in template.parts:
        if p.kind == "text":
            out.append(_escape(p.value))
        elif p.kind == "field":
            out.append(p.space + "{_demo%d_%s}" % (c, p.value))
        elif p.kind == "mask":
            out.append(p.space + _escape(word))
    return "".join(out).strip()


class Demonstrations:
    """What a classification task needs to read its rows with demonstrations (module docstring)."""

    def __init__(self, mode: str, encoder: str, seed: int):
        self.mode, self.encoder_name, self.seed = mode, encoder, seed
        self.before = False  # causal backbones: demonstrations before the query (bind)
        self.embedder = None  # texts -> (n, d) unit vectors; set by bind for `similar` (tests may stub it)
        self._vectors: dict[str, torch.Tensor] = {}
        self._templates: dict[tuple, Template] = {}
        self._pool: list[dict] | None = None

    def bind(self, kind: str) -> None:
        """Place demonstrations for this backbone kind; load the sentence encoder for `similar`
        (so a model that cannot load fails before a run directory exists)."""
        self.before = kind == "causal"
        if self.mode == "similar" and self.embedder is None:
            encoder = load_encoder(self.encoder_name)
            self.embedder = lambda texts: embed(encoder, texts)

    # -- which rows ----------------------------------------------------------------------------
    def pool(self, task) -> list[dict]:
        if self._pool is None:
            self._pool = list(task.training_rows())
        return self._pool

    @staticmethod
    def key(row: dict, fields: list[str]) -> str:
        return hashlib.sha1(json.dumps([str(row[f]) for f in fields]).encode()).hexdigest()[:16]

    def vectors(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), d), each text embedded once per task object."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        if missing:
            if self.embedder is None:
                raise PtuneError("task.demonstrations=similar: the task is not bound to a backbone yet (ptune.build "
                                 "binds it); call task.bind(backbone, method) first")
            for t, v in zip(missing, self.embedder(missing)):
                self._vectors[t] = torch.as_tensor(v, dtype=torch.float32)
        return torch.stack([self._vectors[t] for t in texts])

    def choose(self, task, rows: list[dict], set_index: int, training: bool) -> list[list[int]]:
        """Per row, one index into the pool per class (class order). training: rows ARE the pool, in
        its order, and row i never demonstrates itself."""
        pool = self.pool(task)
        fields = list(dict.fromkeys(task.template.fields))
        by_class = [[i for i, r in enumerate(pool) if r["label"] == c] for c in range(len(task.labels))]
        for c, members in enumerate(by_class):
            if len(members) < (2 if training else 1):
                need = "2 training rows" if training else "a training row"
                raise PtuneError(f"task.demonstrations={self.mode} needs {need} "
                                 f"of class {task.labels[c]!r} (a training example never demonstrates itself) and the "
                                 f"training rows hold {len(members)}; raise task.few_shot or task.max_train_samples")
        sims = None
        if self.mode == "similar":
            def text(r):
                return " ".join(str(r[f]) for f in fields)

            sims = self.vectors([text(r) for r in rows]) @ self.vectors([text(r) for r in pool]).T  # (rows, pool)
        out = []
        for n, row in enumerate(rows):
            rng = random.Random(f"{self.seed}/{self.key(row, fields)}/{set_index}")
            chosen = []
            for members in by_class:
                cands = [i for i in members if not (training and i == n)]
                if sims is not None:
                    cands = sorted(cands, key=lambda i: (-float(sims[n, i]), i))
                    cands = cands[:max(1, int(len(cands) * FILTER_RATE))]
                chosen.append(cands[rng.randrange(len(cands))])
            out.append(chosen)
        return out

    # -- how they are written ------------------------------------------------------------------
    def template(self, template: Template, words: list[str]) -> Template:
        """The query's template with one demonstration per class (word: its label word), before the
        query on causal backbones and after it otherwise."""
        key = (template.source, tuple(words), self.before)
        if key not in self._templates:
            demos = [demo_source(template, w, c) for c, w in enumerate(words)]
            parts = [*demos, template.source] if self.before else [template.source, *demos]
            self._templates[key] = Template(" ".join(parts), key="task.template with task.demonstrations")
        return self._templates[key]

    def attach(self, task, rows: list[dict], set_index: int, training: bool) -> list[tuple[Template, dict]]:
        """Per row: (the template with demonstrations, the row with the demonstrations' fields)."""
        pool = self.pool(task)
        template = self.template(task.template, [ws[0] for ws in task.verbalizer])
        fields = list(dict.fromkeys(task.template.fields))
        out = []
        for row, chosen in zip(rows, self.choose(task, rows, set_index, training)):
            extra = {f"_demo{c}_{f}": pool[i][f] for c, i in enumerate(chosen) for f in fields}
            out.append((template, {**row, **extra}))
        return out


def check_positions(method, lengths: list[int]) -> None:
    """Inputs with demonstrations (plus the method's virtual tokens) must fit the model's position
    table, as train.job.check_context checks training inputs (duplicated: a task does not import the
    training wing)."""
    config = method.backbone.model.config
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    longest, p = max(lengths, default=0), method.num_virtual_tokens
    if limit and p + longest > limit:
        raise PtuneError(f"with task.demonstrations the longest input is {longest} tokens"
                         f"{f' plus {p} virtual tokens' if p else ''}, more than model "
                         f"{method.backbone.name}'s {limit} positions; lower task.max_len")
