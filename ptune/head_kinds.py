"""The values of `task.head`, each declared once: what the head is and how it is built.

A head is the part that turns the backbone's states into class scores or text (ptune/heads.py for
the losses). The task, the builder, mixed-adapter batches, ensembles, domain transfer and PEFT
export read a head's `HeadKind` (`HEADS[task.head]`) instead of comparing its name, as they read a
method's `acts_on` (tests/test_house.py checks that no module outside the heads' own files compares
a head's name). A new head is one entry here and its own file.

    linear            a trained Linear on the pooled state (ptune/heads.py; P-tuning v2, BERT)
    lm                the LM generates the answer (generation tasks)
    vocab             the whole vocabulary at {mask} (LAMA; ptune/verbalizer.py VocabHead)
    verbalizer        label words scored at {mask} by the LM (PET, LM-BFF; ptune/verbalizer.py)
    soft-verbalizer   WARP's trained class vectors at {mask} (ptune/soft_verbalizer.py)
    proto-verbalizer  ProtoVerb's prototypes at {mask} (ptune/proto_verbalizer.py)
    knowledgeable     KPT's expanded, refined label words (ptune/knowledgeable.py)
    rules             PTR: a verbalizer per {mask:slot} and a rule table (ptune/rules.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ptune.errors import PtuneError


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
    calibrates: bool = False  # task.calibrate applies (ptune/calibration.py)
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


KPT_KEYS = ("kpt_words", "kpt_neighbours", "kpt_prior_rows", "kpt_threshold", "kpt_relevance", "kpt_calibrate",
            "kpt_aggregate")
# The task keys that one head alone reads (its HeadKind.keys). Under any other head a value away from
# the task file's default would be accepted and ignored, so the task refuses it (check_unread).
HEAD_KEYS = ("head_dropout", "proto_dim", "proto_combine", *KPT_KEYS, "slots", "rules")


def _linear(task, backbone, method, seed, saved):
    from ptune.heads import LinearHead

    if not method.trains:
        # By definition it trains nothing; with a trained head it would be a linear probe, which
        # is fine-tune's `trainable=head` (and reported as such, with its trainable count).
        raise PtuneError(f"method={method.name} trains nothing, so task.head=linear would train only the classifier "
                         f"on a frozen backbone (a linear probe); run that as method=fine-tune method.trainable=head")
    return LinearHead(backbone.dims.hidden, len(task.labels), task.head_dropout, seed=seed)


def _task_slot_head(task, backbone, method, seed, saved):  # the task's own words (or vocabulary) at {mask}
    return task.slot_head(backbone)


def _soft(task, backbone, method, seed, saved):
    from ptune.soft_verbalizer import build_head

    return build_head(task, backbone, seed)


def _proto(task, backbone, method, seed, saved):
    from ptune.proto_verbalizer import build_head

    return build_head(task, backbone, seed)


def _knowledgeable(task, backbone, method, seed, saved):
    from ptune import knowledgeable

    return knowledgeable.build_head(task, backbone, method, saved)


def _rules(task, backbone, method, seed, saved):
    from ptune import rules

    return rules.build_head(task, backbone)


HEADS: dict[str, HeadKind] = {k.name: k for k in (
    HeadKind("linear", classifies=True, build=_linear, served="pooled", transfer="classifier", keys=("head_dropout",)),
    HeadKind("lm", classifies=False, build=None, generates=True, served="text"),
    HeadKind("vocab", classifies=False, build=_task_slot_head, at_mask=True, lm_words=True),
    HeadKind("verbalizer", classifies=True, build=_task_slot_head, at_mask=True, label_words=True, lm_words=True,
             calibrates=True, demonstrations=True, served="words", transfer="words"),
    HeadKind("soft-verbalizer", classifies=True, build=_soft, at_mask=True, label_words=True, calibrates=True,
             served="state"),
    HeadKind("proto-verbalizer", classifies=True, build=_proto, at_mask=True, label_words=True, calibrates=True,
             served="state", keys=("proto_dim", "proto_combine")),
    HeadKind("knowledgeable", classifies=True, build=_knowledgeable, at_mask=True, label_words=True, lm_words=True,
             calibrates=True, saved_config=True, served="words", keys=KPT_KEYS),
    HeadKind("rules", classifies=True, build=_rules, at_mask=True, several_masks=True, lm_words=True,
             calibrates=True, served="words", keys=("slots", "rules")),
)}

CLASSIFICATION = tuple(n for n, k in HEADS.items() if k.classifies)  # the choices of a classification task


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


def names(flag: str) -> list[str]:
    """The heads with `flag` set, for messages ("use task.head=... or ...")."""
    return [n for n, k in HEADS.items() if k.classifies and getattr(k, flag)]
