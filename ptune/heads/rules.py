"""Rules over several masks — Han, Zhao, Ding, Liu & Sun 2021, "PTR: Prompt Tuning with Rules for
Text Classification" (`task.head=rules`).

A template holds several named answer slots, `{mask:a} ... {mask:b}` (ptune/tasks/templates.py); each slot
has its own small verbalizer, and a rule table says which combination of slot values stands for
which class:

    task.template: "{text} The {mask:aspect} was {mask:polarity} ."
    task.slots:  {aspect: {food: food, service: service}, polarity: {pos: great, neg: [terrible, awful]}}
    task.rules:  {food_good: {aspect: food, polarity: pos}, food_bad: {aspect: food, polarity: neg}, ...}

`task.slots` maps each slot to {value: word or [words]}; `task.rules` maps every label to the value of
each slot (every slot named, every label a combination of its own). The class score is PTR's
product of per-slot probabilities, as a log:

    score(y) = log sum_{paths} prod_j P(w_j | x, slot j)

a path being one word per slot from the values rule y names (a value of one word: one path; a value
of several words: their probabilities summed, the logsumexp of the word verbalizer), each word
scored by all its pieces (teacher-forced, verbalizer.py). Training is cross-entropy over the
classes' scores.

Per backbone kind:
- masked (BERT): every slot at once, as PTR: slot j's word is scored with the other slots holding
  one [MASK] each (a word of k pieces gets k [MASK]s, filled left to right), so P factorises per slot;
- causal (GPT-2, Llama): left to right: slot j's word is read after the text up to it, with the
  earlier slots' words of the same path written in (teacher-forced), so score(y) is the probability
  that the LM writes the rule's words into the template; text after the last slot is dropped, and
  fields may stand between slots but not after the last one;
- seq2seq (T5, BART): the encoder reads the template with each slot as T5's sentinel <extra_id_j>
  (or the tokenizer's mask token, BART's <mask>, or nothing), the decoder writes the slots' words
  left to right after its start token (T5: "<extra_id_0> w_a <extra_id_1> w_b", its span format).

Differences from PTR: PTR scores a slot's words by their raw logits restricted to the slot's word
set, sums them over the slots for the class logits, and adds one cross-entropy per slot over its
own words to the class cross-entropy; here each slot word's full-vocabulary log-probability (so the
sum is the log of the product of probabilities PTR's paper writes), and the class cross-entropy
alone. PTR's sub-prompts are entity-typing and relation prompts for relation classification; any
classification task can name its slots here (docs/verbalizers.md shows a two-slot task).
The head holds no tensors: under fine-tune the LM head trains (as the word verbalizer). In mixed-adapter
batches (ptune/infer/pool.py) its rows are word queries like the word verbalizer's, in the same forward.
"""

from __future__ import annotations

import itertools

import torch

from ptune.errors import PtuneError
from ptune.generate import special_wrap
from ptune.heads.verbalizer import SlotHead, word_pieces

MAX_PATHS = 4096  # word combinations per class (each one query row on causal and seq2seq models)


def _words(value, where: str) -> list[str]:
    words = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not words or not all(isinstance(w, str) and w.strip() for w in words):
        raise PtuneError(f"{where}={value!r}: give a non-empty word or a list of non-empty words")
    return [w.strip() for w in words]


KEYS = ("slots", "rules")  # the task keys this head alone reads


def check_options(values: dict, task) -> dict:
    """task.slots and task.rules against the task's template slots and labels: {"slots": {slot: {value:
    [words]}}, "rules": per class {slot: value}}; one PtuneError line for the first problem."""
    table = _slot_table(values["slots"], task.template)
    return {"slots": table, "rules": _rule_table(values["rules"], table, task.template.mask_names, list(task.labels))}


def _slot_table(slots, template) -> dict:
    names = template.mask_names
    example = "{" + ", ".join(f"{n}: {{v1: word, v2: word}}" for n in names) + "}"
    if not isinstance(slots, dict) or not slots:
        raise PtuneError(f"task.head=rules needs task.slots, {{slot: {{value: word or [words]}}}} for each of the "
                         f"template's slots, e.g. task.slots='{example}'")
    slots = {str(k): v for k, v in slots.items()}
    missing = [n for n in names if n not in slots]
    extra = [k for k in slots if k not in names]
    if missing or extra:
        what = f"has no entry for the slot {missing[0]!r}" if missing else f"names {extra[0]!r}, which is not a slot"
        raise PtuneError(f"task.slots {what} of task.template={template.source!r} (slots: "
                         f"{', '.join(names)}; write {{mask:name}} in the template)")
    table = {}
    for n in names:
        if not isinstance(slots[n], dict) or not slots[n]:
            raise PtuneError(f"task.slots.{n}={slots[n]!r} must map each value of the slot to a word or [words]")
        table[n] = {str(v): _words(w, f"task.slots.{n}.{v}") for v, w in slots[n].items()}
        seen: dict = {}
        for v, ws in table[n].items():
            for w in ws:
                if seen.setdefault(w, v) != v:
                    raise PtuneError(f"task.slots.{n}: the word {w!r} stands for both {seen[w]!r} and {v!r}")
    return table


def _rule_table(rules, table: dict, names: list[str], labels: list[str]) -> list[dict]:
    if not isinstance(rules, dict) or not rules:
        raise PtuneError(f"task.head=rules needs task.rules, {{label: {{slot: value}}}} for every label, e.g. "
                         f"task.rules.{labels[0]}='{{{', '.join(f'{n}: ...' for n in names)}}}'")
    rules = {str(k): v for k, v in rules.items()}
    extra = [k for k in rules if k not in labels]
    if extra:
        raise PtuneError(f"task.rules names the label {extra[0]!r}, which is not one of {', '.join(labels)}")
    out, combos = [], {}
    for label in labels:
        rule = rules.get(label)
        if not isinstance(rule, dict):
            raise PtuneError(f"task.rules has no rule for the label {label!r}; add task.rules.{label}="
                             f"'{{{', '.join(f'{n}: ...' for n in names)}}}'")
        rule = {str(k): str(v) for k, v in rule.items()}
        for n in names:
            if n not in rule or rule[n] not in table[n]:
                got = f"gives {n}={rule[n]!r}, not a value of task.slots.{n}" if n in rule else f"names no value of {n}"
                raise PtuneError(f"task.rules.{label} {got} ({', '.join(table[n])})")
        if set(rule) - set(names):
            raise PtuneError(f"task.rules.{label} names {sorted(set(rule) - set(names))[0]!r}, not a slot of "
                             f"the template")
        combo = tuple(rule[n] for n in names)
        if combo in combos:
            raise PtuneError(f"task.rules gives {label!r} and {combos[combo]!r} the same values "
                             f"({', '.join(combo)}), so the two classes always score the same")
        combos[combo] = label
        out.append({n: rule[n] for n in names})
    return out


def check_template(template, backbone) -> None:
    """A causal model reads left to right: something before the first slot, no field after the last."""
    if backbone.kind != "causal":
        return
    kinds = [p.kind for p in template.parts]
    last = max(i for i, k in enumerate(kinds) if k == "mask")
    after = [p.value for p in template.parts[last + 1:] if p.kind == "field"]
    if after:
        raise PtuneError(f"{template.key}={template.source!r} puts {{{after[0]}}} after the last answer slot, and a "
                         f"causal model (model={backbone.name}) predicts each slot from the text before it; move the "
                         f"slots after the fields")
    if kinds[0] == "mask":
        raise PtuneError(f"{template.key}={template.source!r} starts with an answer slot, and a causal model has "
                         f"nothing to predict it from; put the slots after the input")


class RulesHead(SlotHead):
    """Class scores (batch, n_classes) from a rule table over several mask slots (module docstring).

    slots: the slot names in template order; words: per slot {value: [word piece ids]}; rules: per
    class {slot: value}. Batches carry `mask_positions` (batch, n_slots)."""

    def __init__(self, backbone, slots: list[str], words: dict, rules: list[dict], labels: list[str],
                 texts: dict | None = None, template: str | None = None):
        super().__init__(backbone)
        self.slots, self.words, self.rules, self.labels = slots, words, rules, labels
        self.texts, self.template = texts, template
        self.paths = []  # per class: its paths, each a tuple of one word's pieces per slot
        for label, rule in zip(labels, rules):
            paths = list(itertools.product(*[words[s][rule[s]] for s in slots]))
            if len(paths) > MAX_PATHS:
                raise PtuneError(f"task.rules.{label}: {len(paths)} word combinations over the slots, more than "
                                 f"{MAX_PATHS}; give its values fewer words")
            self.paths.append(paths)
        # what the class scores read: one word's log-prob per (slot, key), deduplicated over the paths
        self.keys = list(dict.fromkeys(self._key(j, p) for paths in self.paths for p in paths
                                       for j in range(len(slots))))
        tok = backbone.tokenizer
        self.enc_tokens = [[]] * len(slots)  # seq2seq: what the encoder reads at each slot
        self.sentinels = [[]] * len(slots)  # seq2seq: what the decoder writes before each slot's word
        if self.kind == "seq2seq":
            self.dec_start = [self.start_id, *special_wrap(tok)[0]]
            if self.mask_id is not None:
                self.enc_tokens = [[self.mask_id]] * len(slots)
            else:
                ids = [tok.convert_tokens_to_ids(f"<extra_id_{j}>") for j in range(len(slots))]
                if all(isinstance(i, int) and i != tok.unk_token_id for i in ids):
                    self.enc_tokens = self.sentinels = [[i] for i in ids]

    def _key(self, j: int, path: tuple) -> tuple:
        """What slot j's score depends on: its word alone (masked), or the words up to it (left to right)."""
        return (j, path[j]) if self.kind == "masked" else (j, path[:j + 1])

    def _queries(self, ids: list[int], soft: list[bool], slots: list[int], keys: list[tuple]) -> dict:
        """Rows scoring each key's word (module docstring), deduplicated: row key -> [ids, soft, dec, targets]."""
        out: dict = {}
        for key in keys:
            j, ws = key
            word = ws if self.kind == "masked" else ws[-1]
            k = len(word)
            if self.kind == "masked":
                at = slots[j]
                for t in range(k):
                    row = ids[:at] + list(word[:t]) + [self.mask_id] * (k - t) + ids[at + 1:]
                    srow = soft[:at] + [False] * k + soft[at + 1:]
                    out.setdefault(tuple(row), [row, srow, None, []])[3].append((at + t, word[t], key))
                continue
            if self.kind == "causal":
                row, srow = ids[:slots[0]], soft[:slots[0]]
                for i in range(j):
                    row = row + list(ws[i]) + ids[slots[i] + 1:slots[i + 1]]
                    srow = srow + [False] * len(ws[i]) + soft[slots[i] + 1:slots[i + 1]]
                start = len(row)
                row, srow = row + list(word[:-1]), srow + [False] * (k - 1)
                out.setdefault(("c", tuple(row)), [row, srow, None, []])[3] += \
                    [(start - 1 + t, word[t], key) for t in range(k)]
                continue
            enc, senc = list(ids), list(soft)
            for i in reversed(range(len(slots))):  # last slot first: earlier indices stay valid
                enc[slots[i]:slots[i] + 1] = self.enc_tokens[i]
                senc[slots[i]:slots[i] + 1] = [False] * len(self.enc_tokens[i])
            dec = list(self.dec_start)
            for i in range(j):
                dec += self.sentinels[i] + list(ws[i])
            dec += self.sentinels[j]
            start = len(dec)
            dec += list(word[:-1])
            out.setdefault(("s", tuple(dec)), [enc, senc, dec, []])[3] += \
                [(start - 1 + t, word[t], key) for t in range(k)]
        return out

    def scores(self, method, batch) -> torch.Tensor:
        ids, attn, where = batch["input_ids"], batch["attention_mask"], batch["mask_positions"]
        soft = batch.get("soft_mask")
        queries, owners = [], []
        for r in range(ids.shape[0]):
            keep = attn[r].bool()
            row = ids[r][keep].tolist()
            srow = soft[r][keep].tolist() if soft is not None else [False] * len(row)
            for q in self._queries(row, srow, where[r].tolist(), self.keys).values():
                queries.append(q)
                owners.append(r)
        pieces: list[list] = [[] for _ in range(ids.shape[0])]  # per row: (key, log-prob of one piece)
        for r, q, picked in zip(owners, queries, self._log_probs(method, queries)):
            pieces[r] += [(key, v) for (_, _, key), v in zip(q[3], picked)]
        return torch.stack([self.class_scores(p) for p in pieces])  # (batch, n_classes)

    # -- for callers that run the forward themselves (mixed-adapter batches, ptune.infer.pool) --
    def queries(self, ids: list[int], mask_pos: list[int]) -> list[tuple[list[int], list[tuple]]]:
        """As VerbalizerHead.queries, for one example whose slots sit at `mask_pos` (every slot's index,
        template order; no soft slots): input rows with targets [(position, token, key)]."""
        return [(q[0], q[3]) for q in self._queries(ids, [False] * len(ids), list(mask_pos), self.keys).values()]

    def class_scores(self, pieces: list[tuple[tuple, torch.Tensor]]) -> torch.Tensor:
        """(n_classes,) from one example's [(key, log-prob of one piece)]: a key's word log-prob is the sum
        of its pieces', a class's score the logsumexp over its paths of the sum over the slots."""
        got: dict = {}  # key -> log P(the key's word)
        for key, v in pieces:
            got[key] = got[key] + v if key in got else v
        return torch.stack([torch.logsumexp(torch.stack([sum(got[self._key(j, p)] for j in range(len(self.slots)))
                                                         for p in paths]), 0) for paths in self.paths])

    def config(self) -> dict:
        return {"kind": "rules", "labels": self.labels, "slots": self.slots, "slot_words": self.texts,
                "rules": self.rules,
                "word_pieces": {s: {v: [list(w) for w in ws] for v, ws in self.words[s].items()} for s in self.slots},
                "combine": "class score = log sum over the rule's word paths of prod over slots of P(word | slot)"
                           + (", slots left to right with the earlier words teacher-forced" if self.kind != "masked"
                              else ", slots scored at once (the others masked)"),
                **({"template": self.template} if self.template else {})}


def build(task, backbone, method, seed: int, saved) -> RulesHead:
    """The rules head of `task` (task.slots, task.rules as check_options gave them) on `backbone`."""
    tok = backbone.tokenizer
    spaces = task.template.mask_spaces
    words = {s: {v: [word_pieces(tok, w, spaces[s], f"task.slots.{s}.{v}") for w in ws]
                 for v, ws in task.head_options["slots"][s].items()} for s in task.template.mask_names}
    return RulesHead(backbone, list(task.template.mask_names), words, task.head_options["rules"], list(task.labels),
                     texts=task.head_options["slots"], template=task.template.source)
