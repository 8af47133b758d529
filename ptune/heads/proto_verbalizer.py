"""The prototypical verbalizer — Cui, Hu, Ding, Huang & Liu 2022, "Prototypical Verbalizer for
Prompt-based Few-shot Tuning" (ProtoVerb; `task.head=proto-verbalizer`).

The last hidden state at the template's {mask}, h (batch, hidden) (mask_state.py), is
projected, v = W h with W (dim, hidden) and no bias (`task.proto_dim`, 64 as in OpenPrompt), and
compared by cosine similarity S(a, b) = a·b / (|a| |b|) with one prototype per class, c
(n_classes, dim). Class scores are S(v, c_n); P(n | x) = softmax_n S(v, c_n), the distribution the
instance-prototype loss trains (and what calibration and ensembles read). It needs no LM head:
it runs on encoders (model=minilm).

Training: the paper's two InfoNCE losses, on the examples of each micro-batch (labels y):
- instance-prototype: for each instance i, -log [exp S(v_i, c_{y_i}) / sum_n exp S(v_i, c_n)];
- instance-instance: for each anchor i and each instance j of its class (i itself included, as in
  the authors' OpenPrompt code), -log [exp S(v_i, v_j) / (exp S(v_i, v_j) + sum_{k: y_k != y_i}
  exp S(v_i, v_k))], averaged over the anchor's positives.
An example's loss is the sum of its two terms; the trainer divides the batch's sum by the number
of examples. (The paper names no prototype-prototype loss; these two are its objective.)

`task.proto_combine=true` (the paper's "ProtoVerb + manual verbalizer"): the manual verbalizer's
class scores (log P(label words), verbalizer.py) and the similarities are each standardised
over the classes (z-scores, (x - mean) / std with the unbiased std, as OpenPrompt's `scaler`) and
averaged; training adds the manual verbalizer's cross-entropy (PET's loss) to each example's loss.
With two classes every z-scored pair is ±1/sqrt(2), so the combined score only says whether the
two agree: a disagreement is an exact tie, which goes to the lower class index.

Differences from the paper and OpenPrompt: OpenPrompt tunes the PLM with the manual verbalizer's
loss, then fits W and the prototypes on the frozen mask states of the whole training set (30
full-batch Adam epochs, lr 0.01); ptune trains W, the prototypes and the method together in the
one training loop, at trainer.lr, with the contrastive losses on each micro-batch (so with
trainer.grad_accum > 1 the instance pairs are formed within micro-batches). The normalisation is
per example; the authors' code divides by N^2 K (and N^2 K^2) for N classes of K instances, i.e.
by a further constant N. Initialisation as OpenPrompt's: W as torch's Linear (uniform
+-1/sqrt(hidden)), prototypes Xavier-uniform, both from a generator seeded with the run's seed.
The paper's untuned-PLM setting (only W and the prototypes train) is method=fine-tune
method.trainable=head; method=hard-prompt trains nothing and is refused (ptune.build.attach_head).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ptune.errors import PtuneError
from ptune.heads.mask_state import MaskStateHead
from ptune.heads.verbalizer import VerbalizerHead, check_backbone, label_pieces


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, dim), (m, dim) -> (n, m) cosine similarities."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def losses(v: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example (instance-prototype, instance-instance) losses, each (batch,) (module docstring).

    v: (batch, dim) projected mask states; prototypes: (n_classes, dim); labels: (batch,)."""
    proto = -F.log_softmax(cosine(v, prototypes), dim=-1).gather(1, labels[:, None]).squeeze(1)
    sim = cosine(v, v)  # (batch, batch)
    same = labels[:, None] == labels[None, :]  # (batch, batch), the diagonal included
    # exp of a cosine is at most e: no overflow, and a batch of one class (no negatives) stays finite
    neg = (sim.exp() * ~same).sum(-1, keepdim=True)  # (batch, 1): sum over the other classes' instances
    pair = torch.log(sim.exp() + neg) - sim  # (batch, batch): -log [exp S_ij / (exp S_ij + neg_i)]
    inst = (pair * same).sum(-1) / same.sum(-1)
    return proto, inst


def zscore_mean(*scores: torch.Tensor) -> torch.Tensor:
    """The mean of (batch, n_classes) scores, each standardised over the classes (OpenPrompt's scaler)."""
    z = [(s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True).clamp_min(1e-12) for s in scores]
    return torch.stack(z).mean(0)


class ProtoVerbHead(MaskStateHead):
    """Parameters `proj.weight` (dim, hidden) and `prototypes` (n_classes, dim), saved as head.*."""

    space = "hidden"

    def __init__(self, backbone, labels: list[str], *, dim: int, seed: int, manual=None):
        super().__init__(backbone)
        hidden = backbone.dims.hidden
        generator = torch.Generator().manual_seed(seed)
        self.labels = labels
        self.proj = nn.Linear(hidden, dim, bias=False)
        with torch.no_grad():  # torch's Linear init (kaiming-uniform, a=sqrt(5)) = U(-1/sqrt(hidden), 1/sqrt(hidden))
            self.proj.weight.uniform_(-1 / math.sqrt(hidden), 1 / math.sqrt(hidden), generator=generator)
        bound = math.sqrt(6 / (len(labels) + dim))  # Xavier-uniform, as OpenPrompt's prototypes
        self.prototypes = nn.Parameter(torch.empty(len(labels), dim).uniform_(-bound, bound, generator=generator))
        self.manual = manual  # a VerbalizerHead (task.proto_combine) or None; no tensors

    def from_parts(self, states: torch.Tensor, words: torch.Tensor | None) -> torch.Tensor:
        """(batch, hidden) mask states [, (batch, n_classes) manual scores] -> (batch, n_classes)."""
        sims = cosine(self.proj(states.to(self.proj.weight.dtype)), self.prototypes)
        return sims if words is None else zscore_mean(words.float(), sims.float())

    def loss(self, method, batch) -> tuple[torch.Tensor, int]:
        """Summed per-example ProtoVerb losses (+ the manual verbalizer's cross-entropy when combined)."""
        labels = batch["labels"].to(self.prototypes.device)
        proto, inst = losses(self.proj(self.states(method, batch)), self.prototypes, labels)
        total = (proto + inst).sum()
        if self.manual is not None:
            total = total + F.cross_entropy(self.manual.scores(method, batch), labels, reduction="sum")
        return total, labels.shape[0]

    def config(self) -> dict:
        n, dim = self.prototypes.shape
        return {"kind": "proto-verbalizer", "labels": self.labels, "dim": dim, "hidden": self.proj.weight.shape[1],
                "similarity": "cosine", "combine": ("mean of the z-scored manual verbalizer and prototype scores"
                                                    if self.manual is not None else None),
                **({"word_pieces": [[list(w) for w in ws] for ws in self.manual.words]} if self.manual else {}),
                "tensors": "head.proj.weight (dim, hidden), head.prototypes (n_classes, dim)"}


KEYS = ("proto_dim", "proto_combine")  # the task keys this head alone reads


def check_options(values: dict, task) -> dict:
    """task.proto_dim (an integer >= 1) and task.proto_combine (a bool)."""
    dim, combine = values["proto_dim"], values["proto_combine"]
    if not isinstance(combine, bool):
        raise PtuneError(f"task.proto_combine={combine!r} is invalid: write true or false")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise PtuneError(f"task.proto_dim={dim!r} is invalid: the prototypes' dimension, an integer >= 1 "
                         f"(ProtoVerb: 64)")
    return {"proto_dim": dim, "proto_combine": combine}


def build(task, backbone, method, seed: int, saved) -> ProtoVerbHead:
    """task.head=proto-verbalizer: prototypes of task.proto_dim, with the manual verbalizer beside them
    under task.proto_combine."""
    manual = None
    if task.head_options["proto_combine"]:
        check_backbone(backbone, "task.proto_combine=true (the manual verbalizer's word scores beside the prototypes)")
        manual = VerbalizerHead(backbone, label_pieces(task, backbone), list(task.labels))
    return ProtoVerbHead(backbone, list(task.labels), dim=task.head_options["proto_dim"], seed=seed, manual=manual)
