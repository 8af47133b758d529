"""Several adapters on one frozen backbone: load K runs, answer rows of different tasks together.

    pool = Pool.load({"sst2": "outputs/a", "e2e": "outputs/b"})   # or Pool.load(["outputs/a", ...])
    pool.predict([{"adapter": "sst2", "sentence": "great"}, {"adapter": "e2e", "mr": "name[X]"}])
        -> ["positive", "X is a ..."]                               # one answer per row, in order

`Pool.load` reads every run's config.yaml, checks that all use the same backbone (the whole
`model` config) and a method that leaves it untouched (`Method.acts_on` other than "weights": prompt, p-tuning,
prefix, p-tuning-v2, hard-prompt), builds the backbone ONCE and each run's method, task and head on it (methods keep
the backbone outside their module tree, `method._backbone`, so K methods share one copy), and
loads each adapter. Rows then go through `ptune.infer.mixed`: one forward per batch whatever the mix of
adapters, each row with its own prompt or prefix, with the outputs it gets alone.

What a row's adapter answers with (its task's head, as `ptune predict` with that run alone; how each
head is served is its HeadKind.served, ptune/heads/):
- classification, linear head: the label of its own head's logits over the pooled state;
- classification, verbalizer head: the label whose words score best at the template's {mask}; the
  knowledgeable head (KPT) the same way, with its refined words and priors as the adapter saved them;
  the rules head (PTR) with its slot words' queries in the same forward, combined by its rule table;
- classification, soft / proto verbalizer (ptune/heads/mask_state.py): its own head on the row's state at
  {mask}, all such rows in one forward; task.calibrate runs: calibrated as the adapter alone;
- generation (e2e, xsum, custom generation; causal models): greedy decoding, one line of text,
  up to the task's max_new_tokens, all generation rows of a batch decoded together.

The pieces under `predict` are public for callers that need scores, not labels (prompt
ensembles, the serving benchmark): `encode` (rows -> token rows with their adapter index),
`class_scores` (per row its own head's (n_classes,) scores), `generate` (per row its text), and
`alone(name)` -> (method, task) to run one adapter by itself (`task.predict(method, rows, b)`).

Served adapter by adapter, not mixed: seq2seq backbones (T5, BART; rows grouped by adapter, one
forward per group; `class_scores` and `generate` refuse them) and beam-search runs
(task.decoding=beam: `decode_alone`, the run's own task with its beams). Not supported: p-tuning with
{soft} slots inside its template; LAMA's vocabulary head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ptune import heads, methods
from ptune.build import build_backbone, load_run, load_trained, setup_logging
from ptune.data import Example, collate
from ptune.errors import PtuneError
from ptune.generate import newline_ids
from ptune.heads import calibration
from ptune.infer import mixed

ADAPTER_FIELD = "adapter"


@dataclass
class Adapter:
    """One loaded run: its method (on the pool's backbone), task and what it answers with."""

    name: str
    method: object
    task: object
    run_dir: Path | None = None

    @property
    def head(self) -> str:
        """The task's head, a key of ptune.heads.HEADS ('linear', 'verbalizer', 'lm', ...)."""
        return self.task.head

    @property
    def served(self) -> str | None:
        """How a mixed forward scores its rows (HeadKind.served): pooled, words, state, text, or None."""
        return heads.get(self.head).served

    @property
    def decodes_alone(self) -> bool:
        """A generation adapter whose task decodes with beam search (task.decoding=beam): its rows are
        decoded by its own task (transformers' beam search), not in mixed greedy batches."""
        return self.served == "text" and getattr(self.task, "num_beams", 1) != 1

    def info(self) -> dict:
        """JSON-able description (GET /adapters)."""
        out = {"name": self.name, "method": self.method.name, "task": self.task.name, "head": self.head,
               "prompt_length": self.method.num_virtual_tokens, "run": str(self.run_dir) if self.run_dir else None}
        if self.served != "text":
            out["labels"] = list(self.task.labels)
        out["fields"] = list(self.task.input_fields)
        return out


def parse_runs(spec: str) -> dict[str, str]:
    """`a,b` or `sst2:outputs/a,e2e:outputs/b` -> {alias: run dir}; the default alias is the dir's name."""
    out: dict[str, str] = {}
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        alias, sep, path = item.partition(":")
        if not sep:
            alias, path = Path(item).name, item
        if not alias or not path:
            raise PtuneError(f"run={spec!r}: write run=<dir>[,<dir>...] or run=<name>:<dir>[,<name>:<dir>...]")
        if alias in out:
            raise PtuneError(f"run={spec!r} names the adapter {alias!r} twice; give each run its own name: "
                             f"run={alias}:<dir>,other:<dir>")
        out[alias] = path
    if not out:
        raise PtuneError("run= is empty; give at least one run directory")
    return out


class Pool:
    """Adapters by name on one shared Backbone (see the module docstring)."""

    def __init__(self, backbone, adapters: dict[str, Adapter]):
        self.backbone = backbone
        self.adapters = dict(adapters)
        self.names = list(self.adapters)
        self._methods = [a.method for a in self.adapters.values()]
        for a in self.adapters.values():
            if a.method.backbone is not backbone:
                raise PtuneError(f"adapter {a.name!r} is built on another backbone object; build every method on "
                                 f"the pool's one backbone")
            mixed.side_of(a.method)
            _check_task(a)

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, runs, which: str = "adapter", trust_remote_code: bool = False) -> Pool:
        """runs: {name: run dir} or [run dir, ...] (named by the directory's name)."""
        if not isinstance(runs, dict):
            runs = {Path(r).name: r for r in runs}
        if not runs:
            raise PtuneError("no runs to load; give at least one run directory")
        setup_logging(None)
        configs = {name: load_run(path, trust_remote_code) for name, path in runs.items()}
        first = next(iter(configs))
        model = OmegaConf.to_container(configs[first][1].model, resolve=True)
        for name, (run_dir, cfg) in configs.items():
            other = OmegaConf.to_container(cfg.model, resolve=True)
            if other != model:
                key = next(k for k in sorted(set(model) | set(other)) if model.get(k) != other.get(k))
                raise PtuneError(f"runs must share one backbone: {run_dir} has model.{key}={other.get(key)!r}, "
                                 f"{configs[first][0]} has {model.get(key)!r}")
            if methods.METHODS[cfg.method.name].acts_on == "weights":
                raise PtuneError(f"{run_dir} is a method={cfg.method.name} run, which changes the backbone's weights; "
                                 f"several runs share one backbone only with prompt, p-tuning, prefix, p-tuning-v2 "
                                 f"or hard-prompt")
        backbone = build_backbone(configs[first][1])
        adapters = {}
        for name, (run_dir, cfg) in configs.items():
            _, method, task = load_trained(run_dir, cfg, which, backbone=backbone)
            adapters[name] = Adapter(name, method, task, run_dir)
        return cls(backbone, adapters)

    def info(self) -> list[dict]:
        return [a.info() for a in self.adapters.values()]

    def alone(self, name: str):
        """(method, task) of one adapter, to run it by itself: task.predict(method, rows, batch_size)."""
        return self.adapters[name].method, self.adapters[name].task

    def index(self, name) -> int:
        if name not in self.adapters:
            raise PtuneError(f"unknown adapter {name!r}; this pool serves: {', '.join(self.names)}")
        return self.names.index(name)

    # -- encoding ------------------------------------------------------------------------------
    def check(self, inputs: list[dict]) -> None:
        """One PtuneError line for the first row without a known adapter or without its task's fields."""
        for i, row in enumerate(inputs):
            if not isinstance(row, dict):
                raise PtuneError(f"input {i} is not an object of named fields")
            name = row.get(ADAPTER_FIELD, self.names[0] if len(self.names) == 1 else None)
            if name is None:
                raise PtuneError(f"input {i} names no adapter; add \"adapter\": one of {', '.join(self.names)}")
            a = self.adapters[self.names[self.index(name)]]
            fields = a.info()["fields"]
            missing = [f for f in fields if not isinstance(row.get(f), str)]
            if missing:
                raise PtuneError(f"input {i} (adapter {name!r}, task {a.task.name}) needs a text field {missing[0]!r}")
            empty = [f for f in fields if not row[f].strip()]
            if empty:
                raise PtuneError(f"input {i} (adapter {name!r}, task {a.task.name}) has an empty {empty[0]!r}; give it "
                                 f"some text")

    def _adapter_of(self, row: dict) -> Adapter:
        return self.adapters[row.get(ADAPTER_FIELD, self.names[0])]

    def encode(self, inputs: list[dict]) -> list[dict]:
        """Per row: {"adapter": index, "ids": token ids, "mask_pos": index of {mask} or None}, as the
        row's task encodes it alone (template and truncation for classification, the source for generation)."""
        self.check(inputs)
        tok = self.backbone.tokenizer
        out = []
        for row in inputs:
            a = self._adapter_of(row)
            ids, pos = a.task.prediction_inputs(tok, self.backbone.kind, row)
            out.append({"adapter": self.index(a.name), "ids": ids, "mask_pos": pos})
        return out

    # -- one forward for a mixed batch ---------------------------------------------------------
    def class_scores(self, inputs: list[dict]) -> list[torch.Tensor]:
        """Per classification row, its own head's scores (n_classes,): linear logits, or the
        verbalizer's log P(label words | x) (logsumexp over a class's words); all rows in one forward
        per head kind (linear rows one, verbalizer queries one)."""
        mixed.check_kind(self.backbone)
        return self._class_scores(self.encode(inputs))

    def _class_scores(self, encoded: list[dict]) -> list[torch.Tensor]:
        out: list = [None] * len(encoded)
        linear = [i for i, e in enumerate(encoded) if self._served(e) == "pooled"]
        slot = [i for i, e in enumerate(encoded) if self._served(e) == "words"]  # KPT: its refined, saved words
        learned = [i for i, e in enumerate(encoded) if self._served(e) == "state"]
        gen = [i for i, e in enumerate(encoded) if self._served(e) == "text"]
        if gen:
            raise PtuneError(f"input {gen[0]} belongs to a generation adapter; class_scores takes classification rows")
        if linear:
            for i, s in zip(linear, self._linear([encoded[i] for i in linear])):
                out[i] = s
        if slot:
            for i, s in zip(slot, self._verbalizer([encoded[i] for i in slot])):
                out[i] = s
        if learned:
            for i, s in zip(learned, self._mask_heads([encoded[i] for i in learned])):
                out[i] = s
        return self._calibrated(encoded, out)

    def _calibrated(self, encoded: list[dict], scores: list[torch.Tensor]) -> list[torch.Tensor]:
        """Rows of adapters trained with task.calibrate: their scores calibrated as the adapter alone
        calibrates them (ptune/heads/calibration.py: the content-free inputs through its own task.class_scores)."""
        for k, name in enumerate(self.names):
            a = self.adapters[name]
            rows = [i for i, e in enumerate(encoded) if e["adapter"] == k]
            if rows and getattr(a.task, "calibrate", False):
                calibrated = calibration.apply(a.task, a.method, torch.stack([scores[i] for i in rows]), len(rows))
                for i, s in zip(rows, calibrated):
                    scores[i] = s
        return scores

    def _mask_heads(self, encoded: list[dict]) -> list[torch.Tensor]:
        """Soft- and proto-verbalizer rows (ptune/heads/mask_state.py): every row's state at its mask in one
        forward, then its own head; ProtoVerb with task.proto_combine adds its manual verbalizer's word
        scores (one more forward, as verbalizer rows)."""
        heads = [self._methods[e["adapter"]].head for e in encoded]
        queries = [(e["adapter"], *h.mask_query(e["ids"], e["mask_pos"]), h.pad_id, h.space)
                   for e, h in zip(encoded, heads)]
        states = mixed.mask_states(self._methods, queries)  # (rows, hidden)
        combined = [r for r, h in enumerate(heads) if getattr(h, "manual", None) is not None]
        words = dict(zip(combined, self._verbalizer([encoded[r] for r in combined], manual=True))) if combined else {}
        with torch.no_grad():
            return [h.from_parts(states[r:r + 1], words[r][None] if r in words else None)[0].cpu()
                    for r, h in enumerate(heads)]

    def _served(self, e: dict) -> str | None:
        return self.adapters[self.names[e["adapter"]]].served

    def width(self, e: dict) -> int:
        """Columns an encoded row takes in a mixed forward (ptune.infer.mixed packs each row): its soft
        prompt (prompt, p-tuning) + its tokens; a prefix adds keys, no columns."""
        m = self._methods[e["adapter"]]
        return (m.num_virtual_tokens if m.acts_on == "input" else 0) + len(e["ids"])

    def _batch(self, encoded: list[dict], side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask (batch, S) padded on `side`, adapter ids (batch,)."""
        batch = collate([Example(e["ids"], e["ids"]) for e in encoded], self.backbone.tokenizer.pad_token_id,
                        padding_side=side)
        device = next(self.backbone.model.parameters()).device
        adapters = torch.tensor([e["adapter"] for e in encoded], device=device)
        return batch["input_ids"].to(device), batch["attention_mask"].to(device), adapters

    def _linear(self, encoded: list[dict]) -> list[torch.Tensor]:
        ids, mask, adapters = self._batch(encoded, "right")
        pooled = mixed.pooled(self._methods, ids, mask, adapters)  # (batch, hidden)
        out = []
        with torch.no_grad():
            for r, e in enumerate(encoded):
                head = self._methods[e["adapter"]].head
                head.eval()  # no dropout at inference
                out.append(head(pooled[r:r + 1])[0])
        return out

    def _verbalizer(self, encoded: list[dict], manual: bool = False) -> list[torch.Tensor]:
        """Word-verbalizer scores per row; manual: those of the rows' heads' own manual verbalizers."""
        queries, owners = [], []  # one forward for every query of every row
        heads = [self._methods[e["adapter"]].head for e in encoded]
        heads = [h.manual for h in heads] if manual else heads
        for r, (e, head) in enumerate(zip(encoded, heads)):
            for row, targets in head.queries(e["ids"], e["mask_pos"]):
                queries.append((e["adapter"], row, head.pad_id, targets))
                owners.append(r)
        pieces: list[list] = [[] for _ in encoded]  # per row: (candidate, log-prob of one piece)
        for (_, _, _, targets), lp, owner in zip(queries, mixed.slot_log_probs(self._methods, queries), owners):
            pieces[owner] += [(c, v) for (_, _, c), v in zip(targets, lp.cpu())]
        return [head.class_scores(pieces[r]) for r, head in enumerate(heads)]

    def generate(self, inputs: list[dict]) -> list[str]:
        """Per generation row, one line of greedy text (as generate.generate_from_ids decodes it)."""
        mixed.check_kind(self.backbone)
        return self._generate(self.encode(inputs))

    def _generate(self, encoded: list[dict]) -> list[str]:
        for i, e in enumerate(encoded):
            if self._served(e) != "text":
                raise PtuneError(f"input {i} belongs to a classification adapter; generate takes generation rows")
            if self.adapters[self.names[e["adapter"]]].decodes_alone:
                raise PtuneError(f"input {i} belongs to adapter {self.names[e['adapter']]!r}, which decodes with beam "
                                 f"search; Pool.predict decodes its rows with its own task")
        tok = self.backbone.tokenizer
        ids, mask, adapters = self._batch(encoded, "left")
        limits = [self.adapters[self.names[e["adapter"]]].task.max_new_tokens for e in encoded]
        new = mixed.greedy(self._methods, ids, mask, adapters, limits, [tok.eos_token_id] + newline_ids(tok),
                           tok.pad_token_id)
        return [tok.decode(n, skip_special_tokens=True).split("\n")[0].strip() for n in new]

    def decode_alone(self, inputs: list[dict], idx: list[int], batch_size: int = 16) -> dict[int, str]:
        """{i: text} for the rows inputs[i] (i in idx) of beam-search adapters, adapter by adapter through
        its own task (as `ptune predict` with that run alone)."""
        out = {}
        for name in self.names:
            mine = [i for i in idx if self._adapter_of(inputs[i]).name == name]
            if mine:
                a = self.adapters[name]
                rows = [{k: v for k, v in inputs[i].items() if k != ADAPTER_FIELD} for i in mine]
                out.update(zip(mine, a.task.predict(a.method, rows, batch_size)))
        return out

    # -- answers -------------------------------------------------------------------------------
    def predict(self, inputs: list[dict], batch_size: int = 16) -> list[str]:
        """One answer per row (a label name or a generated line), in order. Rows of any mix of
        adapters are batched together, batch_size rows per forward (classification and generation
        rows in separate batches); on a seq2seq backbone, adapter by adapter."""
        self.check(inputs)
        out: list = [None] * len(inputs)
        if self.backbone.kind not in mixed.MIXED_KINDS:
            for name, a in self.adapters.items():
                idx = [i for i, r in enumerate(inputs) if r.get(ADAPTER_FIELD, self.names[0]) == name]
                if idx:
                    rows = [{k: v for k, v in inputs[i].items() if k != ADAPTER_FIELD} for i in idx]
                    for i, p in zip(idx, a.task.predict(a.method, rows, batch_size)):
                        out[i] = p
            return out
        # Rows sorted by their width in a mixed forward (own prompt + own tokens, stable) before batching:
        # a forward is as wide as its widest row, so rows of similar widths pad less.
        encoded = self.encode(inputs)
        order = sorted(range(len(inputs)), key=lambda i: self.width(encoded[i]))
        for i, text in self.decode_alone(inputs, [i for i in order if self._adapter_of(inputs[i]).decodes_alone],
                                         batch_size).items():
            out[i] = text
        order = [i for i in order if out[i] is None]
        gen = [i for i in order if self._served(encoded[i]) == "text"]
        cls_ = [i for i in order if self._served(encoded[i]) != "text"]
        for idx in _chunks(cls_, batch_size):
            for i, s in zip(idx, self._class_scores([encoded[i] for i in idx])):
                out[i] = self._adapter_of(inputs[i]).task.labels[int(s.argmax())]
        for idx in _chunks(gen, batch_size):
            for i, text in zip(idx, self._generate([encoded[i] for i in idx])):
                out[i] = text
        return out


def _chunks(idx: list[int], size: int) -> list[list[int]]:
    return [idx[s:s + size] for s in range(0, len(idx), size)]


def _check_task(a: Adapter) -> None:
    served = a.served
    if served == "text" and not a.task.input_fields:
        raise PtuneError(f"adapter {a.name!r}: task {a.task.name} is not served by several-run predict (served: "
                         f"classification with a linear or verbalizer head, and generation tasks that name their "
                         f"input fields); run it alone with ptune predict run=<dir>")
    if served is None:  # LAMA's vocabulary head
        raise PtuneError(f"adapter {a.name!r}: task.head={a.head} is not served by several-run predict (mixed batches, "
                         f"ensembles, serve with several runs); run it alone: ptune predict run=<dir>")
    if a.task.soft_positions:
        raise PtuneError(f"adapter {a.name!r}: p-tuning with {{soft}} slots inside the template is not served by "
                         f"several-run predict; run it alone with ptune predict run=<dir>")
