"""What every classification task shares: a template, label names, a head, and its metrics.

A task subclass says where its rows come from (`rows(split)`: dicts of text fields and an integer
`label`), its `labels` (names, in class-index order), the fields its template may use, and its
default template and verbalizer. This base turns rows into examples through the template
language (ptune/tasks/templates.py) and scores a method through the head `task.head`. What each
head is, how it is built and which task keys it reads live in ptune/heads/ (the registry,
ptune/heads/__init__.py); the task reads the head's flags (`self.head_kind`) and hands the keys
one head alone reads to that head's own check (`self.head_options`), so it holds no head's options:

- `linear` (heads/linear.py): a trained classifier on the pooled hidden state, as P-tuning v2
  (Liu et al. 2022) and BERT. One difference from both: they pass [CLS] through BERT's pretrained
  pooler (dense + tanh, trained for next-sentence prediction) before the classifier; ptune loads
  masked backbones as masked LMs, which carry no pooler, so the linear head reads [CLS] itself.
  Default template: the fields alone (`default_template["linear"]`); a {mask} in it is written as
  the tokenizer's mask token (left out where there is none); {soft} slots are left out (p-tuning
  then prepends).
- `verbalizer` (heads/verbalizer.py): label words scored at the template's {mask} by the LM itself
  (PET / LM-BFF / Lester / zero-shot with method=hard-prompt). `task.verbalizer` maps each label
  to a word or a list of words; {soft} slots go to p-tuning.
- `soft-verbalizer` / `proto-verbalizer`, `knowledgeable`, `rules`: WARP, ProtoVerb, KPT, PTR
  (docs/verbalizers.md); `task.calibrate`: contextual calibration of any verbalizer-type head.
- `lm` (generation) is for generation tasks; a classification task refuses it with the fix.

Input text is tokenized with the tokenizer's own special tokens ([CLS] x [SEP] for BERT, x </s>
for T5, <s> x </s> for BART, nothing for GPT-2 and SmolLM2), at most `task.max_len` tokens (P-tuning
v2 uses 128); only the fields are cut (ptune/tasks/templates.py). Few-shot sampling
(tasks/fewshot.py) and demonstrations (tasks/demonstrations.py) shape the input here too.
"""

from __future__ import annotations

import torch

from ptune import heads, metrics
from ptune.config import group_defaults
from ptune.data import Example, collate, subsample
from ptune.errors import PtuneError
from ptune.heads import calibration
from ptune.heads.linear import class_logits
from ptune.heads.rules import check_template as check_slots_template
from ptune.heads.verbalizer import (
    VerbalizerHead,
    check_backbone,
    check_template,
    label_pieces,
    slot_scores,
    takes_soft_mask,
)
from ptune.tasks import demonstrations as demos
from ptune.tasks import fewshot
from ptune.tasks.base import Task
from ptune.tasks.templates import Template, token_ids, token_strings


# -- metrics: ptune's shipped `evaluate` modules (ptune/metrics), hand-checked in tests/test_tasks.py --
def accuracy(predictions: list[int], labels: list[int]) -> float:
    """Fraction of predictions equal to their label (ValueError on no labels or a length mismatch)."""
    return metrics.compute("accuracy", predictions, labels)["accuracy"]


def macro_f1(predictions: list[int], labels: list[int]) -> float:
    """Unweighted mean over the classes that occur (in labels or predictions) of F1 = 2PR / (P + R),
    as scikit-learn's f1_score(average="macro"), which SuperGLUE's CB scorer uses."""
    return metrics.compute("macro_f1", predictions, labels)["macro_f1"]


def verbalizer_words(verbalizer, labels, key: str = "task.verbalizer") -> list[list[str]]:
    """Per label (in class order) its words, from {label: word or [words]}; PtuneError on a gap."""
    if not isinstance(verbalizer, dict) or not verbalizer:
        raise PtuneError(f"{key}={verbalizer!r} must map every label to a word or a list of words, e.g. "
                         f"{key}={{{labels[0]}: ..., {labels[-1]}: ...}}")
    verbalizer = {str(k): v for k, v in verbalizer.items()}
    extra = [k for k in verbalizer if k not in labels]
    if extra:
        raise PtuneError(f"{key} names the label {extra[0]!r}, which is not one of the task's labels "
                         f"({', '.join(labels)})")
    out = []
    for label in labels:
        if label not in verbalizer:
            raise PtuneError(f"{key} has no word for the label {label!r}; add {key}.{label}=<word>")
        words = verbalizer[label]
        words = [words] if isinstance(words, str) else list(words) if isinstance(words, (list, tuple)) else None
        if not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise PtuneError(f"{key}.{label}={verbalizer[label]!r}: give a non-empty word or a list of non-empty words "
                             f"(quote a number: {key}.{label}='5')")
        out.append([w.strip() for w in words])
    seen: dict[str, str] = {}
    for label, words in zip(labels, out):
        for w in words:
            if w in seen and seen[w] != label:
                raise PtuneError(f"{key}: the word {w!r} stands for both {seen[w]!r} and {label!r}, so the two classes "
                                 f"always score the same; give each class its own words")
            seen[w] = label
    return out


class ClassificationTask(Task):
    metric_for_best = "accuracy"
    labels: tuple[str, ...] = ()  # class names, index = class id
    fields: tuple[str, ...] = ()  # the row fields a template may use
    default_template: dict[str, str] = {}  # per head
    default_verbalizer: dict | None = None
    metrics: tuple[str, ...] = ("accuracy",)

    def __init__(self, *, template: str | None, triggers: list | None, head: str, verbalizer: dict | None,
                 max_len: int, few_shot: int | None, few_shot_seed: int, demonstrations: str | None, demo_sets: int,
                 demo_encoder: str, calibrate: bool, **kw):
        head_values = {key: kw.pop(key) for key in heads.HEAD_KEYS if key in kw}  # the keys one head alone reads
        super().__init__(**kw)
        defaults = group_defaults("task", self.name)  # keys a head or mode does not read must stay at these
        fewshot.check(few_shot, few_shot_seed, self.max_train_samples, defaults.get("few_shot_seed"))
        self.few_shot, self.few_shot_seed = few_shot, few_shot_seed
        self._few: tuple[list[dict], list[dict]] | None = None
        kind = heads.get(head)  # what the head is (ptune/heads/__init__.py); one line for a name that is none
        if kind.generates:
            raise PtuneError(f"task.head=lm generates text; task {self.name} classifies: use task.head=verbalizer (the "
                             f"LM scores the label words) or task.head=linear (a trained classifier)")
        if not kind.classifies:
            raise PtuneError(f"task.head={head} is not one of {', '.join(heads.CLASSIFICATION)}")
        if not (isinstance(max_len, int) and max_len >= 2):
            raise PtuneError(f"task.max_len={max_len!r} is invalid: must be an integer >= 2")
        self.head, self.head_kind, self.max_len = head, kind, max_len
        self.calibrate = heads.check_calibrate(kind, calibrate)
        self._template_key = "verbalizer" if kind.at_mask else head  # which default_template entry applies
        self._template_given = template is not None
        self.template = Template(template or self.default_template.get(self._template_key,
                                                                       "{" + "} {".join(self.fields) + "}"))
        self.template.check_fields(self.fields, self.name)
        self.triggers = token_strings(triggers)  # AutoPrompt's trigger tokens at the template's {trigger} slots
        self.template.check_triggers(self.triggers)
        self.trigger_ids: list[int] | None = None  # their ids, set by bind() (a search may write others)
        self.verbalizer = None
        if kind.at_mask:
            self.template.require_mask(f"task.head={head}", several=kind.several_masks)
        if kind.label_words:
            self.verbalizer = verbalizer_words(verbalizer if verbalizer is not None else self.default_verbalizer,
                                               list(self.labels))
        elif verbalizer is not None and verbalizer != defaults.get("verbalizer"):
            raise PtuneError(f"task.verbalizer gives words per class, and task.head={head} scores no label words; use "
                             f"task.head={' or '.join(heads.names('label_words'))}, or leave task.verbalizer at "
                             f"the task's words")
        # the head's own keys, checked by the head (its file's check_options); another head's refused
        self.head_options = heads.options(kind, head_values, defaults, self)
        self.keep_soft = False  # set by bind(): only p-tuning places prompts at {soft} slots
        self._mask_id: int | None = None
        demos.check(demonstrations, demo_sets, demo_encoder, kind, defaults.get("demo_encoder"))  # LM-BFF's (tasks/demonstrations.py)
        self.demo_sets = demo_sets
        self.demos = demos.Demonstrations(demonstrations, demo_encoder, few_shot_seed if few_shot is not None
                                          else self.subsample_seed) if demonstrations else None

    def split_rows(self, split: str) -> list[dict]:
        """Rows of one of the dataset's own splits (train, dev) in file order: the text fields and
        `label` (an int class index)."""
        raise NotImplementedError

    def rows(self, split: str) -> list[dict]:
        """Rows of a split as ptune uses it. Without task.few_shot: the dataset's own split. With it
        (tasks/fewshot.py, LM-BFF's protocol): train = K per class drawn from the training split, dev = K
        per class more from the rest of it, test = the dataset's dev split (the reported number)."""
        if self.few_shot is None:
            if split == "test" and "test" not in self.own_splits:
                raise PtuneError(f"task {self.name}: split=test is the reported split of the few-shot protocol (the "
                                 f"dataset's dev split); set task.few_shot=K, or use split=dev")
            return self.split_rows(split)
        if split == "test":
            return self.split_rows("dev")
        if split not in ("train", "dev"):
            raise PtuneError(f"task {self.name} with task.few_shot={self.few_shot} has splits train, dev (both drawn "
                             f"from the training split) and test (the dataset's dev split), not {split!r}")
        if self._few is None:
            self._few = fewshot.split(self.split_rows("train"), len(self.labels), self.few_shot, self.few_shot_seed,
                                      self.labels)
        return list(self._few[0] if split == "train" else self._few[1])

    own_splits: tuple[str, ...] = ("train", "dev")

    @property
    def report_split(self) -> str | None:
        """The split a finished run is scored on after training (the few-shot protocol's test), or None."""
        return "test" if self.few_shot is not None else None

    def label_words(self) -> list:
        """Per class, its verbalizer words (or its name under a linear head)."""
        return [ws if len(ws) > 1 else ws[0] for ws in self.verbalizer] if self.verbalizer else list(self.labels)

    def init_label_words(self, kind: str) -> list:
        """What method.init=labels embeds: each verbalizer word after the whitespace before {mask}, the
        pieces the verbalizer scores (a byte-level BPE embeds " terrible", not "terrible"), in the template
        bind() will choose for this backbone kind (repeated here: the method is built before bind);
        label names as they are under a linear head."""
        if not self.verbalizer:
            return list(self.labels)
        alt = self.default_template.get(f"{self._template_key}:{kind}")
        space = (Template(alt) if alt and not self._template_given else self.template).mask_space
        return [[space + w for w in ws] for ws in self.verbalizer]

    # -- the head ------------------------------------------------------------------------------
    def bind(self, backbone, method) -> None:
        """Check the template against the backbone and method (called by ptune.build.attach_head) and decide
        how rows are written: soft slots for p-tuning, the mask id for this backbone."""
        causal_default = self.default_template.get(f"{self._template_key}:{backbone.kind}")
        if causal_default and not self._template_given:  # e.g. NLI: a causal model cannot read past {mask}
            self.template = Template(causal_default)
        self.keep_soft = takes_soft_mask(method) and self.head_kind.at_mask and self.template.n_soft > 0
        if self.keep_soft and self.template.n_soft != method.num_virtual_tokens:
            raise PtuneError(f"task.template={self.template.source!r} has {self.template.n_soft} {{soft}} positions "
                             f"and method.num_virtual_tokens={method.num_virtual_tokens}; set method.num_virtual_tokens="
                             f"{self.template.n_soft}")
        tok = backbone.tokenizer
        self.template.check_triggers(self.triggers)  # a search's variant may have replaced either
        self.trigger_ids = token_ids(tok, self.triggers) if self.triggers else None
        if self.head_kind.at_mask:
            if self.head_kind.lm_words:  # the soft and proto heads run on encoders too (ptune/heads/mask_state.py)
                check_backbone(backbone, f"task.head={self.head}")
            (check_slots_template if self.head_kind.several_masks else check_template)(self.template,
                                                                                                      backbone)
            # the mask slot: [MASK] for masked LMs; any id for the others (the head rebuilds those rows)
            self._mask_id = tok.mask_token_id if tok.mask_token_id is not None else tok.pad_token_id
        else:
            self._mask_id = tok.mask_token_id  # a linear head reads the mask token where there is one
        if self.demos is not None:  # causal: demonstrations before the query; `similar` loads its encoder
            self.demos.bind(backbone.kind)

    @property
    def soft_positions(self) -> bool:  # read by ptune export: prompts inside the input
        return self.keep_soft

    @property
    def input_fields(self) -> tuple[str, ...]:
        return tuple(self.template.fields)

    def slot_head(self, backbone) -> VerbalizerHead:
        """The word verbalizer over this task's label words (task.head=verbalizer; ptune/heads/verbalizer.py)."""
        return VerbalizerHead(backbone, label_pieces(self, backbone), list(self.labels), template=self.template.source,
                              triggers=self.triggers)

    # -- encoding ------------------------------------------------------------------------------
    def text(self, row: dict) -> str:
        return self.template.render(row)

    def examples(self, tokenizer, rows: list[dict], demo_set: int = 0, training: bool = False) -> list[Example]:
        """With task.demonstrations: each row with demonstration set `demo_set`; training: rows are
        training_rows() in order, so a row never demonstrates itself."""
        layout = "slot" if self.head_kind.at_mask else "class"
        out = []
        shown = self.demos.attach(self, rows, demo_set, training) if self.demos is not None else None
        for n, r in enumerate(rows):
            template, r = shown[n] if shown else (self.template, r)
            enc = template.encode(tokenizer, r, self.max_len, keep_soft=self.keep_soft, mask_id=self._mask_id,
                                  triggers=self.trigger_ids)
            out.append(Example(enc.ids, [r.get("label", 0)], layout, soft=enc.soft if self.keep_soft else None,
                               mask_pos=enc.mask_pos, masks=enc.masks if self.head_kind.several_masks else None))
        return out

    def prediction_inputs(self, tokenizer, kind: str, row: dict) -> tuple[list[int], int | None]:
        if self.demos is not None and self.demo_sets > 1:
            raise PtuneError(f"task.demo_sets={self.demo_sets} scores each row {self.demo_sets} times (one per "
                             f"demonstration set), which a mixed-adapter batch does not; run the adapter alone "
                             f"(ptune predict run=<dir>)")
        e = self.examples(tokenizer, [{**row, "label": 0}])[0]
        return e.input_ids, e.masks if self.head_kind.several_masks else e.mask_pos

    def encode(self, tokenizer, rows: list[dict]) -> list[list[int]]:
        """Token ids of each row, with the tokenizer's special tokens, at most max_len long."""
        return [e.input_ids for e in self.examples(tokenizer, rows)]

    def training_rows(self) -> list[dict]:
        """The rows training reads (the few-shot train set, or a max_train_samples subset), which
        are also the rows demonstrations are drawn from."""
        rows = self.rows("train")
        return [rows[i] for i in subsample(len(rows), self.max_train_samples, self.subsample_seed)]

    def train_examples(self, tokenizer, kind: str | None = None) -> list[Example]:
        """Examples of layout "class" (linear) or "slot" (verbalizer) whatever the backbone kind;
        with demonstrations, set 0 for every epoch (LM-BFF resamples each epoch)."""
        return self.examples(tokenizer, self.training_rows(), training=True)

    # -- inference -----------------------------------------------------------------------------
    def classify(self, method, rows: list[dict], batch_size: int) -> list[int]:
        """Predicted class index per row (the argmax of class_scores)."""
        return self.class_scores(method, rows, batch_size).argmax(-1).tolist()

    def class_scores(self, method, rows: list[dict], batch_size: int, sets: list[int] | None = None,
                     calibrated: bool = True) -> torch.Tensor:
        """(len(rows), n_classes) head scores (linear logits, verbalizer log-probs). With
        demonstrations: the mean over demonstration sets `sets` (default 0..task.demo_sets-1) of
        each set's scores, as LM-BFF averages over its 16 sets. With task.calibrate (and calibrated):
        contextually calibrated log-probabilities (ptune/heads/calibration.py)."""
        tok = method.backbone.tokenizer
        sets = sets if sets is not None else list(range(self.demo_sets if self.demos is not None else 1))
        total = None
        for s in sets:
            examples = self.examples(tok, rows, demo_set=s)
            if self.demos is not None:
                demos.check_positions(method, [len(e.input_ids) for e in examples])
            scores = self._scores(method, examples, batch_size)
            total = scores if total is None else total + scores
        if calibrated and self.calibrate:
            return calibration.apply(self, method, total / len(sets), batch_size)
        return total / len(sets)

    def _scores(self, method, examples: list[Example], batch_size: int) -> torch.Tensor:
        """(len(examples), n_classes) float scores on the CPU. Batched by length (less padding),
        results in input order."""
        tok = method.backbone.tokenizer
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        device = next(method.backbone.model.parameters()).device
        out = torch.zeros(len(examples), len(self.labels))
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = collate([examples[i] for i in idx], tok.pad_token_id)
                if self.head_kind.at_mask:
                    scores = slot_scores(method, batch)
                else:
                    scores = class_logits(method, batch["input_ids"].to(device), batch["attention_mask"].to(device))
                out[torch.tensor(idx)] = scores.float().cpu()
        return out

    def scores(self, preds: list[int], gold: list[int]) -> dict:
        out = {"accuracy": accuracy(preds, gold)}
        if "macro_f1" in self.metrics:
            out["macro_f1"] = macro_f1(preds, gold)
        return out

    def evaluate(self, method, split: str, batch_size: int) -> tuple[dict, list[dict]]:
        """(metrics, one record per example: text, label and prediction as names)."""
        rows = self.rows(split)
        rows = [rows[i] for i in subsample(len(rows), self.max_eval_samples, self.subsample_seed)]
        preds = self.classify(method, rows, batch_size)
        gold = [r["label"] for r in rows]
        records = [{"text": self.text(r), "label": self.labels[y], "prediction": self.labels[p]}
                   for r, y, p in zip(rows, gold, preds)]
        return self.scores(preds, gold), records

    def predict(self, method, rows: list[dict], batch_size: int) -> list[str]:
        """A label name per input row; rows need the fields the template names."""
        missing = [f for f in self.template.fields if any(f not in r for r in rows)]
        if missing:
            raise PtuneError(f"task {self.name}: every input row needs a {missing[0]!r} field (task.template="
                             f"{self.template.source!r})")
        self.refuse_empty(rows)
        return [self.labels[p] for p in self.classify(method, [{**r, "label": 0} for r in rows], batch_size)]
