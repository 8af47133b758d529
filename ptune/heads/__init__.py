"""The heads: what turns the backbone's states into class scores, text or a loss; one file each.

This file is the room's front door: the values of `task.head`, each declared once (`HEADS`), what
the head is and how it is built, and the loss of a batch (`loss`). The task, the builder,
mixed-adapter batches, ensembles, domain transfer and PEFT export read a head's `HeadKind`
(`HEADS[task.head]`) instead of comparing its name, as they read a method's `acts_on`
(tests/test_house.py checks that no module outside this folder compares a head's name). A new
head is one entry here and its own file, which builds it and checks the task keys it alone reads.

    lm                the LM generates the answer (generation tasks; lm.py)
    linear            a trained Linear on the pooled state (linear.py; P-tuning v2, BERT)
    vocab             the whole vocabulary at {mask} (LAMA; verbalizer.py VocabHead)
    verbalizer        label words scored at {mask} by the LM (PET, LM-BFF; verbalizer.py)
    soft-verbalizer   WARP's trained class vectors at {mask} (soft_verbalizer.py, on mask_state.py)
    proto-verbalizer  ProtoVerb's prototypes at {mask} (proto_verbalizer.py, on mask_state.py)
    knowledgeable     KPT's expanded, refined label words (knowledgeable.py)
    rules             PTR: a verbalizer per {mask:slot} and a rule table (rules.py)

Contextual calibration (`task.calibrate`, calibration.py) applies to the heads that declare
`calibrates`. Head files import one another downward (verbalizer <- mask_state <- soft / proto;
verbalizer <- knowledgeable, rules) and never this file: the registry imports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ptune.errors import PtuneError
from ptune.heads import knowledgeable, linear, lm, proto_verbalizer, rules, soft_verbalizer, verbalizer
from ptune.heads.verbalizer import VocabHead
from ptune.methods.base import Method


@dataclass(frozen=True)
class HeadKind:
    name: str
    classifies: bool  # a choice of a classification task's task.head (lm and vocab belong to their tasks)
    # build(task, backbone, method, seed, saved) -> the head module the method carries, or None: the
    # LM's own output answers (lm). saved: the head as a finished run's adapter config records it.
    build: Callable | None
    generates: bool = False  # writes text (a left-to-right decoder: causal or seq2seq)
    at_mask: bool = False  # scored at the template's {mask}: batches of layout "slot", the verbalizer's template
    several_masks: bool = False  # reads several named {mask:slot}s (task.slots, task.rules)
    label_words: bool = False  # takes task.verbalizer, words per class
    lm_words: bool = False  # reads the LM's own word predictions: refused on encoders without an LM head
    calibrates: bool = False  # task.calibrate applies (calibration.py)
    demonstrations: bool = False  # LM-BFF's demonstrations write its label word at {mask} (tasks/demonstrations.py)
    saved_config: bool = False  # inference needs what training computed, saved in adapter_config.json's head
    # how one forward of several adapters' rows scores it (ptune/infer/pool.py): "pooled" (its own
    # classifier on the pooled state), "words" (label-word queries at {mask}), "state" (its own
    # tensors on the state at {mask}), "text" (greedy decoding), None: served by its run alone
    served: str | None = None
    # how domain transfer maps its classes onto another task's (ptune/infer/transfer.py): "classifier"
    # (merge its logits by a label map), "words" (the new task's label words), None: not mapped
    transfer: str | None = None
    keys: tuple[str, ...] = ()  # the task keys of HEAD_KEYS that this head alone reads
    # check(values of `keys`, task) -> {key: checked value}: the head's own one-line refusals, run by
    # the task once its template and labels are known; None: the values are taken as they are
    check: Callable | None = None


def _task_words(task, backbone, method, seed, saved):  # the task's own words at {mask} (verbalizer.py)
    return task.slot_head(backbone)


def _vocab(task, backbone, method, seed, saved):
    return VocabHead(backbone)


HEADS: dict[str, HeadKind] = {k.name: k for k in (
    HeadKind("linear", classifies=True, build=linear.build, served="pooled", transfer="classifier",
             keys=linear.KEYS, check=linear.check_options),
    HeadKind("lm", classifies=False, build=None, generates=True, served="text"),
    HeadKind("vocab", classifies=False, build=_vocab, at_mask=True, lm_words=True),
    HeadKind("verbalizer", classifies=True, build=_task_words, at_mask=True, label_words=True, lm_words=True,
             calibrates=True, demonstrations=True, served="words", transfer="words"),
    HeadKind("soft-verbalizer", classifies=True, build=soft_verbalizer.build, at_mask=True, label_words=True,
             calibrates=True, served="state"),
    HeadKind("proto-verbalizer", classifies=True, build=proto_verbalizer.build, at_mask=True, label_words=True,
             calibrates=True, served="state", keys=proto_verbalizer.KEYS, check=proto_verbalizer.check_options),
    HeadKind("knowledgeable", classifies=True, build=knowledgeable.build, at_mask=True, label_words=True,
             lm_words=True, calibrates=True, saved_config=True, served="words", keys=knowledgeable.KEYS,
             check=knowledgeable.check_options),
    HeadKind("rules", classifies=True, build=rules.build, at_mask=True, several_masks=True, lm_words=True,
             calibrates=True, served="words", keys=rules.KEYS, check=rules.check_options),
)}

CLASSIFICATION = tuple(n for n, k in HEADS.items() if k.classifies)  # the choices of a classification task
# The task keys that one head alone reads (their HeadKind.keys). Under any other head a value away
# from the task file's default would be accepted and ignored, so `options` refuses it.
HEAD_KEYS = tuple(key for k in HEADS.values() for key in k.keys)


def find(name) -> HeadKind | None:
    """The head `name`, or None for anything else (a saved config's value is untrusted: any type)."""
    return HEADS.get(name) if isinstance(name, str) else None


def get(name) -> HeadKind:
    """The head `name`; one PtuneError line for a name that is none."""
    if find(name) is None:
        raise PtuneError(f"task.head={name!r} is not one of {', '.join(CLASSIFICATION)}; use task.head=linear or "
                         f"verbalizer")
    return HEADS[name]


def yaml_value(value) -> str:
    """A config value as one writes it in an override (null, true, 1e-06, mean)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


def check_unread(kind: HeadKind, values: dict, defaults: dict) -> None:
    """One line for the first of HEAD_KEYS in `values` set away from its default (`defaults`: the
    task file's keys) under the head `kind`, which does not read it."""
    for key in HEAD_KEYS:
        if key in values and key not in kind.keys and values[key] != defaults.get(key):
            readers = [n for n, k in HEADS.items() if key in k.keys]
            raise PtuneError(f"task.{key}={yaml_value(values[key])} is read by task.head={' or '.join(readers)} alone, "
                             f"and task.head={kind.name} would ignore it; use task.head={readers[0]}, or leave "
                             f"task.{key}={yaml_value(defaults.get(key))}")


def options(kind: HeadKind, values: dict, defaults: dict, task) -> dict:
    """The head's own task keys, checked: `values` holds the task's HEAD_KEYS as configured
    (`defaults`: the task file's). One line for a key another head alone reads set away from its
    default, then the head's own check (`kind.check`, with the task's template and labels)."""
    check_unread(kind, values, defaults)
    own = {key: values.get(key, defaults.get(key)) for key in kind.keys}
    return kind.check(own, task) if kind.check is not None else own


def check_calibrate(kind: HeadKind, calibrate) -> bool:
    """task.calibrate under the head `kind` (calibration.py): one line where it cannot apply."""
    if not isinstance(calibrate, bool):
        raise PtuneError(f"task.calibrate={calibrate!r} is invalid: write true or false")
    if calibrate and not kind.calibrates:
        raise PtuneError(f"task.calibrate=true divides a verbalizer's class probabilities by those of content-free "
                         f"inputs, and task.head={kind.name} has no verbalizer; use task.head="
                         f"{', '.join(names('calibrates'))}, or task.calibrate=false")
    return calibrate


def names(flag: str) -> list[str]:
    """The heads with `flag` set, for messages ("use task.head=... or ...")."""
    return [n for n, k in HEADS.items() if k.classifies and getattr(k, flag)]


def loss(method: Method, batch: dict) -> tuple[torch.Tensor, int]:
    """The loss a batch's layout calls for (see ptune.data.Example): (summed loss, number of terms)."""
    layout = batch.get("layout", "causal")
    tensors = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    if layout == "causal":
        return lm.lm_loss(method, **tensors)
    if layout == "seq2seq":
        return lm.seq2seq_loss(method, **tensors)
    if layout == "class":
        return linear.class_loss(method, **tensors)
    if layout == "slot":  # the heads scored at a template's {mask}
        return verbalizer.slot_loss(method, batch)
    raise NotImplementedError(f"no loss for batch layout {layout!r} yet")
