"""LAMA T-REx knowledge probing (Petroni et al. 2019), as in the P-tuning paper (Liu et al. 2021, §4.1).

A fact (subject, relation, object) becomes a cloze: the relation's manual template from
relations.jsonl ("[X] was born in [Y] .") with [X] -> {sub} and [Y] -> {mask}, or one template for
every relation (`task.template`, e.g. P-tuning's learned "{soft:3} {sub} {soft:3} {mask} ." under
method=p-tuning). The model's distribution over its whole vocabulary at the mask (ptune.heads.verbalizer
.VocabHead: [MASK] for BERT, the next token for causal models, the decoder's first token for
T5/BART) is the prediction; P@1 = the fraction of facts whose object is the argmax.

Objects are restricted to single tokens of the model's vocabulary, as in the P-tuning paper (and
LAMA): a fact whose obj_label (with the whitespace before {mask} in the template, so " Paris" for a
byte-level BPE) is not exactly one token is dropped, and evaluation reports how many
(`n_dropped`, beside `n_facts`, the facts scored). Training (p-tuning, prompt, fine-tune, ...)
minimises the cross-entropy of the object token over the vocabulary.

Metrics: `p@1/<relation>` per relation and `p@1`, their unweighted mean (LAMA's and the P-tuning
paper's macro average over relations; a relation none of whose facts has a single-token object is
left out of the mean). A causal model cannot read a subject placed after the
mask ("[Y] is the capital of [X]"): such manual templates are skipped for causal models and
counted in `n_relations_skipped`.

Data: `<task.data_dir>/lama/<relation>/{train,dev,test}.jsonl` (AutoPrompt's T-REx splits, rows
`sub_label, obj_label, predicate_id`) and `lama/relations.jsonl`; else hub `lama`/`trex` (one
split, used as `test`; its rows carry their template). Differences from the paper: one learned
template is shared by the relations of a run (the paper trains one per relation: run with
task.relations=[P19] for that).
"""

from __future__ import annotations

import logging

import torch

from ptune import metrics
from ptune.data import Example, collate, subsample
from ptune.errors import PtuneError
from ptune.heads.verbalizer import VocabHead, check_backbone, check_template, slot_scores, takes_soft_mask
from ptune.tasks.base import Task
from ptune.tasks.custom import read_jsonl
from ptune.tasks.templates import Template

log = logging.getLogger(__name__)
SPLITS = ("train", "dev", "test")


def precision_at_1(predictions: list[int], objects: list[int]) -> float:
    """Fraction of facts whose top-1 prediction is the object, both token ids (ptune's shipped
    `precision_at_1` evaluate module, which compares strings: the ids are compared as decimal text)."""
    if not objects:  # evaluate fails on empty input with an IndexError of its own
        raise ValueError("P@1 of no facts")
    return metrics.compute("precision_at_1", [str(p) for p in predictions], [str(o) for o in objects])["precision_at_1"]


def manual_template(lama_template: str) -> str:
    """"[X] was born in [Y] ." -> "{sub} was born in {mask} ." (braces in the text escaped)."""
    text = lama_template.replace("{", "{{").replace("}", "}}")
    return text.replace("[X]", "{sub}").replace("[Y]", "{mask}")


class LAMA(Task):
    name = "lama"
    metric_for_best = "p@1"
    head = "vocab"
    input_fields = ("sub",)

    def __init__(self, *, template: str | None, relations: list[str] | None, max_len: int, **kw):
        super().__init__(**kw)
        self.user_template = Template(template) if template else None
        if self.user_template is not None:
            self.user_template.check_fields(["sub"], self.name)
            self.user_template.require_mask("task=lama (the object's slot)")
        self.relations = list(relations) if relations else None
        self.max_len = max_len
        self.keep_soft, self._mask_id, self._kind = False, None, None

    # -- data ----------------------------------------------------------------------------------
    def _relation_table(self) -> dict[str, str]:
        path = self.local_file("lama", "relations.jsonl")
        table = {}
        for n, r in read_jsonl(path):
            if not isinstance(r.get("relation"), str) or not isinstance(r.get("template"), str):
                raise PtuneError(f"{path}, line {n}: expected a JSON object with relation and template")
            table[r["relation"]] = r["template"]
        return table

    def facts(self, split: str) -> list[dict]:
        """Rows {sub, obj, relation, template} of the chosen relations, in relation then file order."""
        if split not in SPLITS:
            raise PtuneError(f"task lama has no split {split!r}; use one of {', '.join(SPLITS)}")
        if self.data_dir is None:
            return self._hub_facts(split)
        table = self._relation_table()
        chosen = self.relations or list(table)
        unknown = [r for r in chosen if r not in table]
        if unknown:
            raise PtuneError(f"task.relations names {unknown[0]!r}, which relations.jsonl lacks; use ids such as P19")
        rows = []
        for rel in chosen:
            path = self.data_dir / "lama" / rel / f"{split}.jsonl"
            if not path.exists():
                if self.relations:  # asked for by name: say so
                    raise PtuneError(f"task lama: relation {rel} has no {split} split ({path} does not exist)")
                continue
            for n, r in read_jsonl(path):
                if not isinstance(r.get("sub_label"), str) or not isinstance(r.get("obj_label"), str):
                    raise PtuneError(f"{path}, line {n}: expected a JSON object with sub_label and obj_label")
                rows.append({"sub": r["sub_label"], "obj": r["obj_label"], "relation": rel, "template": table[rel]})
        if not rows:
            raise PtuneError(f"task lama: no facts for split {split} of relations {chosen}")
        return rows

    def _hub_facts(self, split: str) -> list[dict]:
        if split != "test":
            raise PtuneError(f"task lama: the hub's lama/trex has one split (used as test); for {split} set "
                             f"task.data_dir to a folder with lama/<relation>/{split}.jsonl")
        ds = self.hub_split("lama", "trex", "train", "lama/relations.jsonl and lama/<relation>/<split>.jsonl")
        return [{"sub": r["sub_label"], "obj": r["obj_label"], "relation": r["predicate_id"], "template": r["template"]}
                for r in ds if not self.relations or r["predicate_id"] in self.relations]

    # -- templates and the head ----------------------------------------------------------------
    def template_of(self, row: dict) -> Template:
        return self.user_template or _cached_template(row["template"])

    def bind(self, backbone, method) -> None:
        check_backbone(backbone, "task=lama")
        if self.user_template is not None:
            check_template(self.user_template, backbone)
        n_soft = self.user_template.n_soft if self.user_template else 0
        self.keep_soft = takes_soft_mask(method) and n_soft > 0
        if self.keep_soft and n_soft != method.num_virtual_tokens:
            raise PtuneError(f"task.template={self.user_template.source!r} has {n_soft} {{soft}} positions and "
                             f"method.num_virtual_tokens={method.num_virtual_tokens}; set "
                             f"method.num_virtual_tokens={n_soft}")
        tok = backbone.tokenizer
        self._mask_id = tok.mask_token_id if tok.mask_token_id is not None else tok.pad_token_id
        self._kind = backbone.kind

    @property
    def soft_positions(self) -> bool:  # read by ptune export: prompts inside the input
        return self.keep_soft

    def slot_head(self, backbone):
        return VocabHead(backbone)

    def label_words(self) -> None:
        return None  # no fixed label set (prompt init=labels is refused with its own message)

    def _usable(self, tokenizer, rows: list[dict]) -> tuple[list[dict], list[int], int, int]:
        """(facts kept, their object ids, facts dropped as multi-token, relations skipped for a causal model)."""
        kept, objects, dropped, skipped = [], [], 0, set()
        unk = tokenizer.unk_token_id
        ok_template: dict[str, bool] = {}
        for r in rows:
            t = self.template_of(r)
            if t.source not in ok_template:
                try:
                    check_template(t, _KindOnly(self._kind, tokenizer))
                    ok_template[t.source] = True
                except PtuneError:
                    ok_template[t.source] = False
            if not ok_template[t.source]:
                skipped.add(r["relation"])
                continue
            ids = tokenizer(t.mask_space + r["obj"], add_special_tokens=False).input_ids
            if len(ids) != 1 or ids[0] == unk:
                dropped += 1
                continue
            kept.append(r)
            objects.append(ids[0])
        return kept, objects, dropped, len(skipped)

    def _examples(self, tokenizer, rows, objects) -> list[Example]:
        out = []
        for r, obj in zip(rows, objects):
            enc = self.template_of(r).encode(tokenizer, r, self.max_len, keep_soft=self.keep_soft, mask_id=self._mask_id)
            out.append(Example(enc.ids, [obj], "slot", soft=enc.soft if self.keep_soft else None, mask_pos=enc.mask_pos))
        return out

    def train_examples(self, tokenizer, kind: str | None = None) -> list[Example]:
        rows = self.facts("train")
        rows, objects, dropped, skipped = self._usable(tokenizer, rows)
        log.info("lama train: %d facts with single-token objects, %d dropped (multi-token objects), %d relations "
                 "skipped (subject after the mask, causal model)", len(rows), dropped, skipped)
        idx = subsample(len(rows), self.max_train_samples, self.subsample_seed)
        return self._examples(tokenizer, [rows[i] for i in idx], [objects[i] for i in idx])

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, method, split: str, batch_size: int) -> tuple[dict, list[dict]]:
        tok = method.backbone.tokenizer
        rows, objects, dropped, skipped = self._usable(tok, self.facts(split))
        idx = subsample(len(rows), self.max_eval_samples, self.subsample_seed)
        rows, objects = [rows[i] for i in idx], [objects[i] for i in idx]
        if not rows:
            raise PtuneError(f"task lama: no {split} fact has a single-token object for model {method.backbone.name}")
        examples = self._examples(tok, rows, objects)
        order = sorted(range(len(rows)), key=lambda i: len(examples[i].input_ids))
        preds = [0] * len(rows)
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                scores = slot_scores(method, collate([examples[i] for i in chunk], tok.pad_token_id))
                for i, p in zip(chunk, scores.argmax(-1).tolist()):
                    preds[i] = p
        by_rel: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            by_rel.setdefault(r["relation"], []).append(i)
        per = {rel: precision_at_1([preds[i] for i in ix], [objects[i] for i in ix]) for rel, ix in by_rel.items()}
        metrics = {"p@1": sum(per.values()) / len(per), **{f"p@1/{rel}": v for rel, v in per.items()},
                   "n_facts": len(rows), "n_dropped": dropped, "n_relations_skipped": skipped}
        records = [{"relation": r["relation"], "text": self.template_of(r).render(r), "label": r["obj"],
                    "prediction": tok.decode([p]).strip()} for r, p in zip(rows, preds)]
        return metrics, records

    def predict(self, method, rows: list[dict], batch_size: int) -> list[str]:
        if self.user_template is None and any("template" not in r for r in rows):
            raise PtuneError("task lama: predict needs task.template or a 'template' field (\"[X] ... [Y] .\") per row")
        missing = [r for r in rows if "sub" not in r]
        if missing:
            raise PtuneError("task lama: every input row needs a 'sub' field (the subject)")
        self.refuse_empty(rows)
        tok = method.backbone.tokenizer
        rows = [dict(r) for r in rows]  # a row's own template is in LAMA's "[X] ... [Y] ." form
        examples = self._examples(tok, rows, [0] * len(rows))
        out = []
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                scores = slot_scores(method, collate(examples[start:start + batch_size], tok.pad_token_id))
                out += [tok.decode([p]).strip() for p in scores.argmax(-1).tolist()]
        return out


_TEMPLATES: dict[str, Template] = {}


def _cached_template(lama_template: str) -> Template:
    if lama_template not in _TEMPLATES:
        _TEMPLATES[lama_template] = Template(manual_template(lama_template), key="lama relations.jsonl template")
    return _TEMPLATES[lama_template]


class _KindOnly:
    """What check_template reads of a backbone: its kind, tokenizer and name."""

    def __init__(self, kind, tokenizer):
        self.kind, self.tokenizer, self.name = kind, tokenizer, "this model"
