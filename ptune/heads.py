"""Heads turn the backbone's hidden states into a loss.

`lm`: next-token cross-entropy on the positions that carry labels (labels == -100 elsewhere).
Logits are computed only at those positions: for E2E the table and the virtual tokens need none,
and the (hidden x vocab) projection is the largest matmul of a small LM (about a fifth of
SmolLM2-135M's FLOPs), so this roughly halves its cost.

`lm` on an encoder-decoder (`seq2seq_loss`): the decoder's cross-entropy over the target, through
the LM's own forward (`seq2seq_forward`), so T5's output rescaling and BART's final_logits_bias
are the model's code, not a copy; equal to `model(labels=...).loss` x token count (tested).

`linear` (classification, `class_loss`): one vector per example (`pool`) -> dropout -> a trained
Linear(hidden, n_classes) (`LinearHead`, attached by train.build as `method.head`), as in
P-tuning v2's sequence classifiers and BertForSequenceClassification.

`verbalizer` (classification by label words at a template's {mask}, PET/LM-BFF): ptune/verbalizer.py;
`loss` dispatches its "slot" batches there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptune.errors import PtuneError
from ptune.methods.base import Method


def loss(method: Method, batch: dict) -> tuple[torch.Tensor, int]:
    """The loss a batch's layout calls for (see ptune.data.Example): (summed loss, number of terms)."""
    layout = batch.get("layout", "causal")
    tensors = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    if layout == "causal":
        return lm_loss(method, **tensors)
    if layout == "seq2seq":
        return seq2seq_loss(method, **tensors)
    if layout == "class":
        return class_loss(method, **tensors)
    if layout == "slot":  # verbalizer / vocabulary heads at a template's {mask}
        from ptune.verbalizer import slot_loss

        return slot_loss(method, batch)
    raise NotImplementedError(f"no loss for batch layout {layout!r} yet")


def lm_loss(method: Method, input_ids, attention_mask, labels, **_) -> tuple[torch.Tensor, int]:
    """Summed token cross-entropy and the number of label tokens.

    input_ids, attention_mask, labels: (batch, seq). Returns (scalar sum, count): the trainer
    divides by the label-token count of the whole optimizer step (all micro-batches and
    processes), so accumulation and multi-process training give the same gradient as one batch.
    """
    model = method.backbone.model
    hidden = model.base_model(**method.model_inputs(input_ids, attention_mask)).last_hidden_state
    hidden = hidden[:, method.n_prepended:]  # (batch, seq, hidden)
    target = labels[:, 1:]  # token t+1 is predicted at position t
    keep = target != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # (n_label_tokens, vocab)
    loss = F.cross_entropy(logits.float(), target[keep], reduction="sum")
    return loss, int(keep.sum())


def seq2seq_forward(method: Method, input_ids, attention_mask, decoder_input_ids, **kwargs):
    """The encoder-decoder LM's own forward on the method's inputs and the given decoder inputs.

    input_ids, attention_mask: (batch, src) encoder side; decoder_input_ids: (batch, tgt).
    Returns the model's Seq2SeqLMOutput: logits (batch, tgt, vocab), and with
    output_hidden_states=True the decoder's hidden states (decoder_hidden_states[-1]: (batch, tgt, d_model)).

    The LM itself runs, not `model.base_model`: T5ForConditionalGeneration holds no T5Model (its
    `base_model` is itself), and the last step before the softmax differs by family (T5 rescales
    the decoder output by d_model**-0.5 when the head is tied, BART adds `final_logits_bias`).
    The model's own code applies both, so nothing here copies it. Method.model_inputs' kwargs
    (input_ids or inputs_embeds, attention_mask, encoder_outputs, past_key_values) are accepted by
    the LM's forward exactly as by its base model.
    """
    inputs = {**method.model_inputs(input_ids, attention_mask), "decoder_input_ids": decoder_input_ids,
              "use_cache": False, **kwargs}
    return method.backbone.model(**inputs)


def seq2seq_loss(method: Method, input_ids, attention_mask, labels, **_) -> tuple[torch.Tensor, int]:
    """Summed decoder cross-entropy and the number of label tokens.

    input_ids, attention_mask: (batch, src); labels: (batch, tgt), right-padded with -100. The
    decoder reads the labels shifted right behind the model's decoder_start_token_id (-100 -> pad),
    through the model's own `prepare_decoder_input_ids_from_labels`, as `model(labels=...)` does.
    Decoder pads sit after each target under a causal mask, so they never change a real position.
    Nearly every decoder position is a label (only the right padding is not), so the full
    (tgt x vocab) logits the LM computes cost little more than projecting label positions alone.
    """
    model = method.backbone.model
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)  # (batch, tgt)
    logits = seq2seq_forward(method, input_ids, attention_mask, decoder_input_ids).logits  # (batch, tgt, vocab)
    keep = labels != -100
    loss = F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")
    return loss, int(keep.sum())


# -- classification (task.head=linear) ---------------------------------------------------------
class LinearHead(nn.Module):
    """dropout, then Linear(hidden, n_classes): pooled (batch, hidden) -> logits (batch, n_classes).

    As P-tuning v2's classifiers and BertForSequenceClassification: dropout p (their default is
    BERT's hidden_dropout_prob, 0.1), weight ~ N(0, 0.02), bias 0. The weights are drawn from a
    generator seeded with the run's seed, not from the global stream: every method on one seed
    starts from the same head, and attaching a head changes no other random draw of the run.
    Parameters are `weight` (n_classes, hidden) and `bias` (n_classes,): `head.weight` and
    `head.bias` in adapters and checkpoints.
    """

    def __init__(self, hidden: int, n_classes: int, dropout: float = 0.1, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.empty(n_classes, hidden).normal_(0.0, 0.02, generator=generator))
        self.bias = nn.Parameter(torch.zeros(n_classes))
        self.dropout = dropout

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        pooled = F.dropout(pooled.to(self.weight.dtype), self.dropout, self.training)
        return F.linear(pooled, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"hidden={self.weight.shape[1]}, n_classes={self.weight.shape[0]}, dropout={self.dropout}"


def pool(method: Method, input_ids, attention_mask) -> torch.Tensor:
    """One hidden vector per example, (batch, hidden), where the backbone kind keeps its summary:

    - masked / encoder (BERT): [CLS], the first real position after the method's prepended ones
      (P-tuning v2 and BERT read [CLS]; ptune's masked backbones carry no NSP pooler, see
      tasks/classification.py);
    - causal: the last real token, the only one whose state has seen the whole input (as
      transformers' *ForSequenceClassification for decoder-only models);
    - seq2seq: the decoder's state at its first position, fed the decoder_start token; it reads
      the whole encoded input through cross-attention (Sentence-T5's encoder-decoder pooling).

    input_ids, attention_mask: (batch, seq). Positions come from the attention mask, never from
    pad ids (SmolLM2's pad is its EOS), so left- and right-padded batches pool the same token.
    """
    model = method.backbone.model
    if method.backbone.kind == "seq2seq":
        # Every method's model_inputs puts an encoder row's real tokens first (real_tokens_first),
        # so a left-padded row pools as it does alone; nothing to reorder here.
        start = model.config.decoder_start_token_id
        if start is None:
            raise PtuneError(f"model {method.backbone.name} sets no decoder_start_token_id, which the linear head's "
                             f"seq2seq pooling feeds to the decoder; set it in the model's config")
        decoder_input_ids = input_ids.new_full((input_ids.shape[0], 1), start)  # (batch, 1)
        out = seq2seq_forward(method, input_ids, attention_mask, decoder_input_ids, output_hidden_states=True)
        return out.decoder_hidden_states[-1][:, 0]  # the decoder's final (normalised) output
    inputs = method.model_inputs(input_ids, attention_mask)
    hidden = model.base_model(**inputs).last_hidden_state[:, method.n_prepended:]  # (batch, seq, hidden)
    if method.backbone.kind == "causal":
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        index = (positions * attention_mask).argmax(-1)  # (batch,): last position whose mask is 1
    else:
        index = attention_mask.argmax(-1)  # (batch,): argmax returns the first maximum = first real token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def class_logits(method: Method, input_ids, attention_mask) -> torch.Tensor:
    """(batch, n_classes) logits of the linear head that train.build attached as `method.head`."""
    head = getattr(method, "head", None)
    if head is None:
        raise PtuneError("this method has no classification head; train with task.head=linear")
    # The trainer switches only the backbone between train() and eval(); the head's dropout
    # follows it, so one switch governs every dropout of the forward.
    head.train(method.backbone.model.training)
    return head(pool(method, input_ids, attention_mask))


def class_loss(method: Method, input_ids, attention_mask, labels, **_) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch and the number of examples.

    input_ids, attention_mask: (batch, seq); labels: (batch,) class indices.
    """
    logits = class_logits(method, input_ids, attention_mask)
    return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.shape[0]
