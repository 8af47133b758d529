"""The template language: how an example's fields, an answer slot and continuous prompts become one
row of token ids.

    "{sentence} It was {mask} ."            SST-2 cloze (LM-BFF / PET style)
    "{premise} ? {mask} , {hypothesis}"     NLI cloze (PET's RTE/CB pattern)
    "{soft:3} {sub} {soft:3} {mask} ."      P-tuning's LAMA template: 3 + 3 continuous prompts
    "{sentence} {trigger:3} {mask} ."       AutoPrompt's SST-2 template: 3 discrete trigger tokens

Slots:
- `{name}`: the example's field `name` (an identifier), filled with its text;
- `{mask}`: the answer slot; a verbalizer head scores its label words there (at most one per template);
- `{mask:name}`: a named answer slot. Several may stand in one template (`{mask:a} ... {mask:b}`,
  distinct names), read by the rules head (PTR, ptune/heads/rules.py; task.head=rules), which gives each
  slot its own words; an unnamed `{mask}` is the slot "mask" there. Every other head reads one slot;
- `{soft}` / `{soft:N}`: 1 / N continuous prompt positions. p-tuning puts its prompt vectors there
  (through its `soft_mask`); methods that place their own prompts (prompt, prefix, ...) get rows
  without them (`keep_soft=False`);
- `{trigger}` / `{trigger:N}`: 1 / N discrete trigger tokens (AutoPrompt, Shin et al. 2020): ordinary
  vocabulary tokens whose ids the caller gives (`task.triggers`, token strings as the tokenizer
  spells them, e.g. "Ġatmosphere"), in slot order; every method reads them as input tokens. They are
  ids, not text: the whitespace before a trigger slot is not tokenized (a BPE token carries its own
  space, "Ġ");
- everything else is literal text ("anchor" words); `{{` and `}}` are literal braces.

Tokenization. Each part is tokenized on its own, without special tokens, with the whitespace that
precedes it in the template (so a byte-level BPE sees " It" and " great" as it would in running
text); the tokenizer's own special tokens go around the row ([CLS] x [SEP], x </s>, <s> x </s>,
nothing for GPT-2/SmolLM2: `generate.special_wrap`). The mask's preceding whitespace is kept as
`Template.mask_space`: label words are tokenized with it.

Truncation: only field text is cut, never the template's words, soft positions, triggers or the mask. When
the row exceeds `max_len`, the longest field loses its last token, repeatedly (PET's rule), so a
long premise shrinks before a short hypothesis does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ptune.errors import PtuneError
from ptune.generate import special_wrap

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SOFT = re.compile(r"soft(?::(\d+))?")
_TRIGGER = re.compile(r"trigger(?::(\d+))?")
_MASK = re.compile(r"mask(?::\s*([A-Za-z_][A-Za-z0-9_]*))?")


def token_strings(tokens, key: str = "task.triggers") -> list[str] | None:
    """`task.triggers` as a list of token strings (None stays None; one string is a list of one)."""
    if tokens is None:
        return None
    tokens = [tokens] if isinstance(tokens, str) else tokens
    if not isinstance(tokens, (list, tuple)) or not tokens or not all(isinstance(t, str) and t for t in tokens):
        raise PtuneError(f"{key}={tokens!r} must be a list of token strings as the tokenizer spells them, e.g. "
                         f"{key}='[\"Ġatmosphere\",\"Ġtotally\"]', or null")
    return list(tokens)


def token_ids(tokenizer, tokens: list[str], key: str = "task.triggers") -> list[int]:
    """The vocabulary ids of token strings (exact: no tokenization); PtuneError names an unknown one."""
    out = []
    for t in tokens:
        tid = tokenizer.convert_tokens_to_ids(t)
        if tid is None or (tid == tokenizer.unk_token_id and t != tokenizer.unk_token):
            the = tokenizer.convert_ids_to_tokens(tokenizer(" the", add_special_tokens=False).input_ids[:1])
            raise PtuneError(f"{key}: {t!r} is not a token of this tokenizer; write tokens as the tokenizer spells "
                             f"them (' the' is {the[0]!r} here)")
        out.append(int(tid))
    return out


@dataclass(frozen=True)
class Part:
    kind: str  # text | field | mask | soft | trigger
    value: str = ""  # the literal text (text), the field name (field) or the slot's name (mask: "mask" when unnamed)
    n: int = 0  # positions (soft, trigger)
    space: str = ""  # whitespace before the part in the template (fields, mask)


@dataclass
class Encoded:
    """One row: ids (seq,), soft (seq,) True at continuous-prompt positions, mask_pos (None without {mask}),
    masks: the index of every mask slot, in template order (mask_pos is the first)."""

    ids: list[int]
    soft: list[bool]
    mask_pos: int | None
    masks: list[int] | None = None


class Template:
    def __init__(self, source: str, key: str = "task.template"):
        if not isinstance(source, str) or not source.strip():
            raise PtuneError(f"{key}={source!r} is empty; write a template such as '{{text}} It was {{mask}} .'")
        self.source, self.key = source, key
        self.parts = self._parse(source)
        self.fields = [p.value for p in self.parts if p.kind == "field"]
        masks = [p for p in self.parts if p.kind == "mask"]
        self.mask_names = [p.value for p in masks]  # in template order; "mask" for an unnamed {mask}
        if len(masks) > 1 and len(set(self.mask_names)) < len(masks):
            twice = next(n for n in self.mask_names if self.mask_names.count(n) > 1)
            what = (f"{self.mask_names.count(twice)} {{mask}} slots" if twice == "mask"
                    else f"the slot {{mask:{twice}}} twice")
            raise PtuneError(f"{key}={source!r} has {what}; several answer slots need distinct names, e.g. "
                             f"{{mask:a}} ... {{mask:b}} (read by task.head=rules)")
        self.mask_spaces = {p.value: p.space for p in masks}  # whitespace before each slot (its words follow it)
        self.has_mask = bool(masks)
        self.mask_space = masks[0].space if masks else ""
        self.n_soft = sum(p.n for p in self.parts if p.kind == "soft")
        self.n_trigger = sum(p.n for p in self.parts if p.kind == "trigger")

    def _parse(self, source: str) -> list[Part]:
        raw: list[Part] = []
        last = 0
        for m in _TOKEN.finditer(source):
            raw.append(Part("text", source[last:m.start()]))
            last = m.end()
            tok = m.group(0)
            if tok in ("{{", "}}"):
                raw.append(Part("text", tok[0]))
                continue
            if m.group(1) is None:
                raise PtuneError(f"{self.key}={source!r} has an unmatched {tok!r}; write slots as {{name}} and a "
                                 f"literal brace as {{{{ or }}}}")
            name = m.group(1).strip()
            soft = _SOFT.fullmatch(name) or _TRIGGER.fullmatch(name)
            named = _MASK.fullmatch(name)
            if named:
                raw.append(Part("mask", named.group(1) or "mask"))
            elif soft:
                kind = name.partition(":")[0]
                n = int(soft.group(1)) if soft.group(1) is not None else 1
                if n < 1:
                    raise PtuneError(f"{self.key}={source!r}: {{{name}}} has no positions; use {{{kind}:N}}, N >= 1")
                raw.append(Part(kind, n=n))
            elif _FIELD.fullmatch(name):
                raw.append(Part("field", name))
            else:
                raise PtuneError(f"{self.key}={source!r}: {{{m.group(1)}}} is not a slot; use {{field}}, {{mask}}, "
                                 f"{{mask:name}}, {{soft}}, {{soft:N}}, {{trigger}} or {{trigger:N}}")
        raw.append(Part("text", source[last:]))
        # merge adjacent text, then move each text's trailing whitespace onto the slot after it
        merged: list[Part] = []
        for p in raw:
            if p.kind == "text" and merged and merged[-1].kind == "text":
                merged[-1] = Part("text", merged[-1].value + p.value)
            else:
                merged.append(p)
        parts: list[Part] = []
        space = ""
        for p in merged:
            if p.kind == "text":
                text = space + p.value
                stripped = text.rstrip()
                space = text[len(stripped):]
                if stripped:
                    parts.append(Part("text", stripped))
            elif p.kind in ("soft", "trigger"):
                parts.append(p)
                space = ""  # no token carries the whitespace before a soft or trigger slot
            else:
                parts.append(Part(p.kind, p.value, space=space))
                space = ""
        return parts

    # -- checks --------------------------------------------------------------------------------
    def check_fields(self, available, task: str) -> None:
        """PtuneError unless every {field} is one of `available` and there is at least one."""
        available = list(available)
        unknown = [f for f in self.fields if f not in available]
        if unknown or not self.fields:
            what = (f"names the field {unknown[0]!r}, which task {task} rows lack" if unknown
                    else "names no field of the example")
            raise PtuneError(f"{self.key}={self.source!r} {what}; use {', '.join('{' + f + '}' for f in available)}")

    def check_triggers(self, triggers, key: str = "task.triggers") -> None:
        """PtuneError unless `triggers` (a list, or None) fills exactly this template's trigger slots."""
        n = 0 if triggers is None else len(triggers)
        if n != self.n_trigger:
            fix = (f"give {self.n_trigger} token strings as the tokenizer spells them ({key}=[...]), or find them "
                   f"with `ptune search autoprompt`" if self.n_trigger else f"set {key}=null or add {{trigger:{n}}}")
            raise PtuneError(f"{self.key}={self.source!r} has {self.n_trigger} {{trigger}} positions and {key} "
                             f"{'is null' if triggers is None else f'lists {n}'}; {fix}")

    def require_mask(self, why: str, several: bool = False) -> None:
        """PtuneError unless the template has an answer slot; unless `several`, exactly one."""
        if not self.has_mask:
            raise PtuneError(f"{self.key}={self.source!r} has no {{mask}}, which {why} needs; add the answer slot, "
                             f"e.g. '{self.source} It was {{mask}} .'")
        if len(self.mask_names) > 1 and not several:
            raise PtuneError(f"{self.key}={self.source!r} has {len(self.mask_names)} answer slots and {why} reads one; "
                             f"keep one {{mask}}, or score several with task.head=rules (PTR)")

    # -- rows ----------------------------------------------------------------------------------
    def render(self, row: dict, mask: str = "[MASK]", soft: str = "[P]", trigger: str = "[T]") -> str:
        """The row as text (for prediction records), slots shown as `mask`, `soft` and `trigger`."""
        out = []
        for p in self.parts:
            if p.kind == "text":
                out.append(p.value)
            elif p.kind == "field":
                out.append(p.space + str(row[p.value]))
            elif p.kind == "mask":
                out.append(p.space + mask)
            else:
                out.append(" " + (soft if p.kind == "soft" else trigger) * p.n)
        return "".join(out).strip()

    def encode(self, tokenizer, row: dict, max_len: int, keep_soft: bool = True, mask_id: int | None = None,
               special: tuple[list[int], list[int]] | None = None, triggers: list[int] | None = None) -> Encoded:
        """Token ids of `row` in this template, at most max_len long (fields truncated, see module doc).

        mask_id: the id written at the mask slot (BERT's [MASK]; any placeholder for heads that
        build their own inputs around mask_pos); None leaves the slot out (mask_pos None). Soft positions hold id 0, never read by p-tuning;
        with keep_soft=False they are left out. special: (before, after) ids, default special_wrap.
        triggers: the n_trigger ids written at the {trigger} slots, in order (required when there are any).
        """
        self.check_triggers(triggers)
        triggers = list(triggers or [])

        before, after = special if special is not None else special_wrap(tokenizer)
        pieces: list[tuple[Part, list[int]]] = []
        for p in self.parts:
            if p.kind == "text":
                pieces.append((p, tokenizer(p.value, add_special_tokens=False).input_ids))
            elif p.kind == "field":
                pieces.append((p, tokenizer(p.space + str(row[p.value]), add_special_tokens=False).input_ids))
            elif p.kind == "mask":
                if mask_id is not None:  # without one (a linear head, no mask token) the slot is left out
                    pieces.append((p, [mask_id]))
            elif p.kind == "trigger":
                pieces.append((p, triggers[:p.n]))
                triggers = triggers[p.n:]
            elif keep_soft:
                pieces.append((p, [0] * p.n))
        fixed = len(before) + len(after) + sum(len(ids) for p, ids in pieces if p.kind != "field")
        lengths = [len(ids) for p, ids in pieces if p.kind == "field"]
        budget = max_len - fixed
        if budget < len(lengths):  # every field keeps at least one token
            raise PtuneError(f"task.max_len={max_len} leaves no room for the inputs: {self.key}={self.source!r} takes "
                             f"{fixed} tokens of its own (words, special tokens, soft slots, triggers, mask); raise "
                             f"task.max_len")
        while sum(lengths) > budget:
            longest = max(range(len(lengths)), key=lambda i: lengths[i])
            lengths[longest] -= 1
        ids, soft, masks, k = list(before), [False] * len(before), [], 0
        for p, piece in pieces:
            if p.kind == "field":
                piece = piece[:lengths[k]]
                k += 1
            if p.kind == "mask":
                masks.append(len(ids))
            ids += piece
            soft += [p.kind == "soft"] * len(piece)
        ids += after
        soft += [False] * len(after)
        return Encoded(ids, soft, masks[0] if masks else None, masks or None)

