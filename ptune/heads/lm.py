"""The `lm` head: the LM's own next-token (or decoder) cross-entropy, for generation tasks.

`lm_loss` (causal): next-token cross-entropy on the positions that carry labels (labels == -100
elsewhere). Logits are computed only at those positions: for E2E the table and the virtual tokens
need none, and the (hidden x vocab) projection is the largest matmul of a small LM (about a fifth
of SmolLM2-135M's FLOPs), so this roughly halves its cost.

`seq2seq_loss` (encoder-decoder): the decoder's cross-entropy over the target, through the LM's
own forward (`seq2seq_forward`), so T5's output rescaling and BART's final_logits_bias are the
model's code, not a copy; equal to `model(labels=...).loss` x token count (tested).

Both return (summed loss, number of terms): the trainer divides by the terms of the whole
optimizer step, so accumulation and several processes give one batch's gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ptune.methods.base import Method


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
