"""The method contract: every registered method x every tiny backbone, one set of proofs.

    train    (a) the backbone's frozen weights stay bitwise unchanged and gradients reach only the
             method's tensors (and the head); a method that trains backbone weights (fine-tune)
             changes exactly its selection. (b) The loss falls on a small learnable batch.
    reload   (c) adapter save -> load into a fresh backbone and a freshly built method (other seed):
             identical outputs, which differ from the fresh method's own; nothing left trainable.
    padding  (d) each example alone == its row of a left- and of a right-padded batch (1e-5).
    greedy   (e) greedy generate() from a left-padded batch (seq2seq: right-padded too, the way
             ptune.generate pads them) == argmax decoding by hand, step by step, on each row alone.
    beam     (f) width-3 beam search over two steps returns the best path found by hand
             (conftest.best_of_two_step_beam); num_return_sequences gives the beams in order.

Cells. Generation backbones (causal, seq2seq) are exercised through their LM head ("lm": next-token
or decoder cross-entropy, ptune.heads.loss). The masked backbone (tiny-bert) does not generate, so
greedy and beam have no cell there; it is a classifier through ptune.heads.linear.LinearHead ("linear"),
the way ptune trains it; P-tuning v2, the classification method of its paper, also gets the linear
head on every backbone (its own file proved it there). On BERT, hard-prompt and P-tuning's soft
positions read the MLM head ("mlm": a cloze, the word at [MASK]), the only head ptune gives them
there (ptune.build refuses hard-prompt + linear on a masked model; soft positions reach a loss only
through the MLM/verbalizer path), and prompt and P-tuning read it too, beside the linear head, as
their own files proved them.

Variants (VARIANTS): the configurations whose trained or saved tensors differ go through train and
reload: fine-tune's top-1 / head / all, P-tuning's LSTM and MLP encoders. padding, greedy and beam,
which only see the forward, run on each method's first variant, and on P-tuning's prompts at soft
positions of the input ("soft"), which every proof covers. P-tuning v2 with projection=true is
prefix's computation (the same class, the same tensors from the same seed; its prefix dropout acts
in training mode only, and these tests run the backbones in eval mode): prefix's cells are its cells.

hard-prompt trains nothing (trains=False): its contract is that nothing is trainable, nothing gets
a gradient and nothing changes (its loss has no graph), and its adapter is empty, so the round trip
gives the plain model's outputs again; padding, greedy and beam hold as for every other method.

fine-tune's adapter is backbone weights: loading copies them into the fresh backbone, and its
selection stays the tensors that train (acts_on == "weights"); every other method's loaded
tensors are for inference only, so nothing of it is trainable after a load.

Backbones: some proofs run on `sharpened` ones (conftest), see SHARPENED.
"""

import copy
import functools
import json
import os
from dataclasses import replace
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import ROOT, SENTENCES, best_of_two_step_beam, load, sharpened
from ptune import heads, methods
from ptune.adapter import adapter_tensors, load_adapter, load_adapter_tensors, save_adapter
from ptune.data import Example, collate
from ptune.heads.linear import LinearHead, class_logits
from ptune.methods.p_tuning import insert_soft

P = 5  # virtual positions of every method that adds them
KIND = {p.stem: OmegaConf.load(p).kind for p in sorted((ROOT / "conf" / "model").glob("tiny-*.yaml"))}
BACKBONES = ["tiny-gpt2", "tiny-llama", "tiny-t5", "tiny-bart", "tiny-bert"]
GENERATES = ("causal", "seq2seq")


class Variant(NamedTuple):
    label: str
    kw: dict
    soft: bool = False  # P-tuning's prompts at soft positions of the input, not prepended


VARIANTS = {
    "fine-tune": [Variant("top-1", dict(trainable="top-k", k=1)), Variant("head", dict(trainable="head")),
                  Variant("all", dict(trainable="all"))],
    "hard-prompt": [Variant("", {})],
    "p-tuning": [Variant("lstm", dict(num_virtual_tokens=P)), Variant("mlp", dict(num_virtual_tokens=P, encoder="mlp")),
                 Variant("soft", dict(num_virtual_tokens=P), soft=True)],
    "p-tuning-v2": [Variant("", dict(num_virtual_tokens=P))],
    "prefix": [Variant("", dict(num_virtual_tokens=P))],
    "prompt": [Variant("", dict(num_virtual_tokens=P))],
}


class Cell(NamedTuple):
    method: str
    variant: Variant
    backbone: str
    head: str  # "lm" | "linear" | "mlm"

    def __str__(self):
        label = f"[{self.variant.label}]" if self.variant.label else ""
        return f"{self.method}{label}-{self.backbone}-{self.head}"

    @property
    def kind(self):
        return KIND[self.backbone]


def heads_of(method: str, variant: Variant, backbone: str) -> list[str]:
    if KIND[backbone] not in GENERATES:
        if method == "hard-prompt" or variant.soft:
            return ["mlm"]
        return ["linear", "mlm"] if method in ("prompt", "p-tuning") else ["linear"]
    return ["lm", "linear"] if method == "p-tuning-v2" else ["lm"]


CELLS = [Cell(m, v, b, h) for m, vs in VARIANTS.items() for v in vs for b in BACKBONES for h in heads_of(m, v, b)]
FORWARD_CELLS = [c for c in CELLS if c.variant == VARIANTS[c.method][0] or c.variant.soft]  # padding
GENERATION_CELLS = [c for c in FORWARD_CELLS if c.head == "lm"]  # greedy, beam


# -- backbones, methods, batches -----------------------------------------------------------------
# Which backbones are `sharpened` (conftest), per use. Generation: at its own init every tiny
# backbone decodes one repeated token whatever the input, for some method at least (BART and BERT
# initialise N(0, 0.02), T5 at its scaled init; p-tuning-v2's N(0, 1) prefix on tiny-llama, soft
# prompts on tiny-gpt2), and a wrong decoding loop could pass unnoticed there. Training: BART's and
# BERT's flat logits barely learn; T5 learns at its own init (prompt tuning: 1.15 nats in 10 steps)
# and not sharpened (the loss rises 0.05), causal models learn at theirs. Padding and the round trip
# compare outputs: there the backbones keep their own init, at which logits stay below a few units
# and hold the 1e-5 tolerance (sharpened BART's reach 10.8 and round off by 1.1e-5, BERT's MLM
# logits by 1.7e-5), except BERT under the linear head, whose [CLS] state barely depends on the
# input at its own init (the head would read a near constant).
SHARPENED = {"train": {"tiny-bart", "tiny-bert"}, "generate": {"tiny-gpt2", "tiny-llama", "tiny-t5", "tiny-bart"}}


def sharp(cell: Cell, use: str) -> bool:
    if use == "outputs":
        return cell.kind == "masked" and cell.head == "linear"
    return cell.backbone in SHARPENED[use]


@functools.cache
def _pristine(name, sharpen: bool):
    return sharpened(name) if sharpen else load(name)


def fresh(cell: Cell, use: str):
    """The cell's backbone for `use` ("train", "outputs", "generate"), its own copy: methods
    (fine-tune) and training change it."""
    bb = _pristine(cell.backbone, sharp(cell, use))
    return replace(bb, model=copy.deepcopy(bb.model))


def build(cell: Cell, bb, seed: int = 0):
    torch.manual_seed(seed)
    m = methods.build(cell.method, bb, **cell.variant.kw)
    if cell.head == "linear":
        m.attach_head(LinearHead(bb.dims.hidden, 2, dropout=0.0, seed=seed))
    return m


PAIRS = [("name : Eagle | food : French", " The Eagle serves French food."), ("name : Mill", " The Mill.")]
CLOZES = [("a great , moving film . it was [MASK] .", "good"), ("dull . it was [MASK] .", "bad"),
          ("the plot is nothing but boilerplate . it was [MASK] .", "bad")]
GAPS = [[0, 2, 2, 1], [0, 1, 3, 1], [0, 3, 1, 1]]  # row r's soft positions before / between / after its segments


def with_soft(ids: list[int], row: int, soft: bool):
    """(ids, soft flags or None): P soft positions between and after three segments of `ids`; its
    first token ([CLS], a source's first word) stays a real one."""
    if not soft:
        return ids, None
    body = ids[1:]
    return insert_soft([ids[:1], body[:len(body) // 2], body[len(body) // 2:]], GAPS[row % len(GAPS)])


def examples(cell: Cell, tok) -> list[Example]:
    """The cell's small learnable batch: two E2E-like pairs (lm), four sentences (linear), three clozes (mlm)."""
    soft = cell.variant.soft
    if cell.head == "linear":
        return [Example(tok(t).input_ids, [y], "class") for t, y in zip(SENTENCES, (1, 0, 0, 1))]
    if cell.head == "mlm":
        rows = [with_soft(tok(s).input_ids, r, soft) for r, (s, _) in enumerate(CLOZES)]
        return [Example(ids, tok(w, add_special_tokens=False).input_ids, "class", soft=flags)
                for (ids, flags), (_, w) in zip(rows, CLOZES)]
    out = []
    for r, (s, t) in enumerate(PAIRS):
        src, flags = with_soft(tok(s).input_ids, r, soft)
        tgt = tok(t).input_ids + [tok.eos_token_id]
        if cell.kind == "seq2seq":
            out.append(Example(src, tgt, "seq2seq", soft=flags))
        else:
            out.append(Example(src + tgt, [-100] * len(src) + tgt, soft=flags and flags + [False] * len(tgt)))
    return out


def batch_of(tok, exs, side="right"):
    return collate(exs, tok.pad_token_id, padding_side=side)


def inputs(m, input_ids, attention_mask, soft_mask=None):
    return m.model_inputs(input_ids, attention_mask, *([] if soft_mask is None else [soft_mask]))


def outputs(cell: Cell, m, batch):
    """(out, keep): out (batch, positions, ...) the cell's outputs, keep (batch, positions) the
    positions that belong to each row. linear: class logits (one position); seq2seq: the decoder's
    logits over the target; causal and mlm: the logits of every position, the method's prepended
    ones first."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if cell.head == "linear":
        out = class_logits(m, ids, mask)
        return out[:, None], torch.ones(out.shape[0], 1, dtype=torch.bool, device=out.device)
    model = m.backbone.model
    if cell.kind == "seq2seq":
        dec = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        out = model(**inputs(m, ids, mask, batch.get("soft_mask")), decoder_input_ids=dec).logits
        return out, batch["labels"] != -100
    out = model(**inputs(m, ids, mask, batch.get("soft_mask"))).logits
    keep = torch.cat([torch.ones(ids.shape[0], m.n_prepended, dtype=torch.bool, device=ids.device), mask.bool()], 1)
    return out, keep


def task_loss(cell: Cell, m, batch):
    """(summed loss, terms): ptune.heads.loss, the trainer's own; prompts at soft positions and the
    cloze are scored from `outputs` (ptune.heads' losses take no soft mask)."""
    if cell.head != "mlm" and "soft_mask" not in batch:
        return heads.loss(m, batch)
    out, _ = outputs(cell, m, batch)
    labels = batch["labels"]
    if cell.head == "mlm":
        logits = out[:, m.n_prepended:][batch["input_ids"] == m.backbone.tokenizer.mask_token_id]  # one per row
        target = labels
    elif cell.kind == "seq2seq":
        logits, target = out[labels != -100], labels[labels != -100]
    else:  # token t+1 is predicted at t
        keep = labels[:, 1:] != -100
        logits, target = out[:, m.n_prepended:][:, :-1][keep], labels[:, 1:][keep]
    return F.cross_entropy(logits.float(), target, reduction="sum"), len(target)


# -- (a) + (b): what trains, and that it learns --------------------------------------------------
# AdamW steps and lr per method and head. lm: 10 steps at each method's usual rate (prompt tuning
# wants a high one: Lester et al. train at 0.3); linear: 8 steps at 5e-2 with the head fixed (see
# the test), as the per-method files did, the MLP-reparameterized prefix at 1e-2 (at 5e-2 its loss
# jumps from 2.2 to 12.9 on the way) and fine-tune's whole encoder at 3e-3.
RECIPE = {"lm": (10, {"prompt": 1e-1, "p-tuning-v2": 5e-2}, 1e-2),
          "linear": (8, {"fine-tune": 3e-3, "prefix": 1e-2}, 5e-2),
          "mlm": (10, {"prompt": 1e-1}, 1e-2)}
# The least fall (nats, first to last step) per cell, the measured falls beside them. Kept from the
# per-method files: prompt and P-tuning on every generating backbone (here as there: two E2E-like
# pairs, p = 5, 10 steps at the same rate, and their measurements reproduce to two digits: prompt
# on T5 / BART 1.15 / 2.3, P-tuning 0.077 / 0.080 / 0.15 / 0.18 on the causal models, 1.2 / 0.91 on
# T5 / BART; prompt on causal models took 30 steps at 1e-2 there: 0.08 / 0.16); fine-tune's (causal
# 3, seq2seq head 0.3, top-1 2.0, all 2.5, BERT 0.5; set there for 4 to 12 steps); P-tuning v2's
# with the linear head, 0.2; the BERT linear cells', 0.5; the clozes on BERT, prompt 2.0 and P-tuning
# 1.5. The new cells' bars are about half of what was measured.
FALL = {  # (method[variant], head) -> {backbone without "tiny-": bar}    measured gpt2 / llama / t5 / bart / bert
    ("fine-tune[top-1]", "lm"): dict(gpt2=3, llama=3, t5=2.0, bart=2.0),  # 8.5 / 8.7 / 7.5 / 11.6
    ("fine-tune[head]", "lm"): dict(gpt2=3, llama=3, t5=0.3, bart=0.3),  # 8.5 / 8.5 / 1.3 / 8.5
    ("fine-tune[all]", "lm"): dict(gpt2=3, llama=3, t5=2.5, bart=2.5),  # 8.6 / 8.7 / 7.8 / 11.3
    ("fine-tune[top-1]", "linear"): dict(bert=0.5),  # 4.1
    ("fine-tune[head]", "linear"): dict(bert=0.07),  # 0.14: the head alone on BERT's [CLS]
    ("fine-tune[all]", "linear"): dict(bert=0.5),  # 4.2
    ("p-tuning[lstm]", "lm"): dict(gpt2=0.05, llama=0.05, t5=0.4, bart=0.3),  # 0.077 / 0.15 / 1.2 / 0.91
    ("p-tuning[mlp]", "lm"): dict(gpt2=0.05, llama=0.05, t5=0.4, bart=0.3),  # 0.080 / 0.18 / 1.0 / 1.4
    ("p-tuning[soft]", "lm"): dict(gpt2=0.1, llama=0.1, t5=0.4, bart=0.3),  # 0.26 / 0.28 / 1.2 / 0.75
    ("p-tuning[lstm]", "linear"): dict(bert=0.5),  # 2.9
    ("p-tuning[mlp]", "linear"): dict(bert=0.5),  # 2.6
    ("p-tuning[lstm]", "mlm"): dict(bert=1.5),  # 5.6 (the per-method file's clozes: 6.6 prepended, 4.5 soft; bar 1.5)
    ("p-tuning[mlp]", "mlm"): dict(bert=1.5),  # 5.9
    ("p-tuning[soft]", "mlm"): dict(bert=1.5),  # 4.4
    ("p-tuning-v2", "lm"): dict(gpt2=0.1, llama=0.08, t5=1.0, bart=1.5),  # 0.21 / 0.17 / 2.5 / 3.2
    ("p-tuning-v2", "linear"): dict(gpt2=0.2, llama=0.2, t5=0.2, bart=0.2, bert=0.2),  # 2.9 / 4.5 / 11.7 / 3.1 / 1.5
    ("prefix", "lm"): dict(gpt2=0.3, llama=0.3, t5=2.5, bart=1.5),  # 0.78 / 0.59 / 5.8 / 3.3
    ("prefix", "linear"): dict(bert=0.5),  # 2.0
    ("prompt", "lm"): dict(gpt2=0.05, llama=0.05, t5=0.4, bart=0.75),  # 0.082 / 0.14 / 1.15 / 2.3
    ("prompt", "linear"): dict(bert=0.5),  # 1.5
    ("prompt", "mlm"): dict(bert=2.0),  # 5.6 (the per-method file's cloze: 6.4, bar 2.0)
}


def fall_of(cell: Cell) -> float:
    label = f"[{cell.variant.label}]" if cell.variant.label else ""
    return FALL[f"{cell.method}{label}", cell.head][cell.backbone.removeprefix("tiny-")]


@pytest.mark.parametrize("cell", CELLS, ids=str)
def test_training_moves_only_the_method_and_lowers_the_loss(cell):
    bb = fresh(cell, "train")
    m = build(cell, bb)
    batch = batch_of(bb.tokenizer, examples(cell, bb.tokenizer))
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    trained = m.trainable_tensors()
    if not m.trains:  # hard-prompt: nothing to train, nothing gets a gradient, nothing changes
        assert trained == {} and m.adapter_tensors() == {} and not any(p.requires_grad for p in bb.model.parameters())
        loss, _ = task_loss(cell, m, batch)
        assert not loss.requires_grad
        assert all(torch.equal(v, before[k]) for k, v in bb.model.state_dict().items())
        return
    if cell.head == "linear":
        assert {"head.weight", "head.bias"} <= set(trained)
    selected = {id(t) for t in trained.values()}
    loss, n = task_loss(cell, m, batch)
    # what a method declares: prepended positions for prompts in the input, none otherwise
    assert m.n_prepended == (m.num_virtual_tokens if m.acts_on == "input" and not cell.variant.soft else 0)
    (loss / n).backward()
    assert all(p.grad is None for p in bb.model.parameters() if id(p) not in selected)
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in trained.values())
    for t in trained.values():
        t.grad = None
    own = dict(trained)
    if cell.head == "linear" and set(trained) - {"head.weight", "head.bias"}:
        # the method alone must lower the loss: the head is fixed at unit scale, so that the pooled
        # state can move the logits and only the method moves the pooled state
        with torch.no_grad():
            m.head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
        m.head.requires_grad_(False)
        own = {k: t for k, t in trained.items() if not k.startswith("head.")}
    start = {k: t.detach().clone() for k, t in own.items()}
    steps, rates, default = RECIPE[cell.head]
    opt = torch.optim.AdamW(own.values(), lr=rates.get(cell.method, default))
    losses = []
    for _ in range(steps):
        loss, n = task_loss(cell, m, batch)
        (loss / n).backward()
        assert all(p.grad is None for p in bb.model.parameters() if id(p) not in selected)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item() / n)
    assert losses[-1] < losses[0] - fall_of(cell), losses
    assert all(not torch.equal(t, start[k]) for k, t in own.items())  # every trained tensor moved
    for k, p in bb.model.named_parameters(remove_duplicate=False):  # aliases too (a tied LM head)
        assert torch.equal(p, before[k]) != (id(p) in selected), f"{k} {'unchanged' if id(p) in selected else 'changed'}"
    for k, b in bb.model.named_buffers():
        assert k not in before or torch.equal(b, before[k]), k


# -- (c): the adapter round trip -----------------------------------------------------------------
@pytest.mark.parametrize("cell", CELLS, ids=str)
def test_adapter_round_trip_gives_identical_outputs(cell, tmp_path):
    bb = fresh(cell, "outputs")
    m = build(cell, bb)
    torch.manual_seed(2)
    with torch.no_grad():  # away from any initial value
        for t in m.trainable_tensors().values():
            t.add_(torch.randn_like(t) * 0.1)
    save_adapter(tmp_path / "adapter", adapter_tensors(m), m.adapter_config())
    config, tensors = load_adapter(tmp_path / "adapter")
    assert config == json.loads(json.dumps(m.adapter_config()))
    assert tensors.keys() == adapter_tensors(m).keys()
    m2 = build(cell, fresh(cell, "outputs"), seed=1)  # other starting values (and head), then the adapter
    batch = batch_of(bb.tokenizer, examples(cell, bb.tokenizer))
    with torch.no_grad():
        own, _ = outputs(cell, m2, batch)
        load_adapter_tensors(m2, tensors)
        a, b = outputs(cell, m, batch)[0], outputs(cell, m2, batch)[0]
    assert torch.equal(a, b)
    if m.trains:
        assert not torch.equal(a, own)  # the adapter carries the change
    else:
        assert tensors == {} and torch.equal(a, own)
    if m.acts_on != "weights":
        assert not list(m2.trainable_tensors())  # loaded for inference only


# -- (d): padding ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", FORWARD_CELLS, ids=str)
def test_padding_changes_no_output(cell):
    bb = fresh(cell, "outputs")
    m = build(cell, bb)
    tok = bb.tokenizer
    exs = examples(cell, tok)
    assert len({len(e.input_ids) for e in exs}) > 1  # rows of different lengths: padding
    with torch.no_grad():
        alone = [outputs(cell, m, batch_of(tok, [e])) for e in exs]
        for side in ("left", "right"):
            full, keep = outputs(cell, m, batch_of(tok, exs, side))
            for i, (ref, ref_keep) in enumerate(alone):
                assert ref_keep.all() and int(keep[i].sum()) == ref.shape[1]
                torch.testing.assert_close(full[i][keep[i]], ref[0], atol=1e-5, rtol=1e-5)


# -- (e) + (f): generation -------------------------------------------------------------------------
GEN = dict(do_sample=False, eos_token_id=None, forced_eos_token_id=None)  # whole sequences (BART forces EOS)


def sources(cell: Cell, tok):
    """[(ids, soft flags or None)]: the pairs' sources, with soft positions for that variant."""
    return [with_soft(tok(s).input_ids, r, cell.variant.soft) for r, (s, _) in enumerate(PAIRS)]


def source_batch(tok, rows, side):
    exs = [Example(ids, [-100] * len(ids), soft=flags) for ids, flags in rows]
    return collate(exs, tok.pad_token_id, padding_side=side)


def generate(m, batch, **kw):
    soft = {"soft_mask": batch["soft_mask"]} if "soft_mask" in batch else {}
    return m.generate(batch["input_ids"], batch["attention_mask"], **soft, pad_token_id=m.backbone.tokenizer.pad_token_id,
                      **GEN, **kw)


def next_logprobs(cell: Cell, m, ids, mask, soft, new):
    """(vocab,) log-probabilities of the token after one row (1, len) and the new tokens, by a full forward."""
    model = m.backbone.model
    with torch.no_grad():
        if cell.kind == "seq2seq":
            start = model.config.decoder_start_token_id
            out = model(**inputs(m, ids, mask, soft), decoder_input_ids=torch.tensor([[start, *new]])).logits
        else:
            extra = torch.tensor([new], dtype=torch.long).view(1, -1)
            seq, mask = torch.cat([ids, extra], 1), torch.cat([mask, torch.ones_like(extra)], 1)
            soft = None if soft is None else torch.cat([soft, torch.zeros_like(extra, dtype=torch.bool)], 1)
            out = model(**inputs(m, seq, mask, soft)).logits
    return out[0, -1].log_softmax(-1)


@pytest.mark.parametrize("cell", GENERATION_CELLS, ids=str)
def test_greedy_equals_step_by_step_argmax(cell):
    bb = fresh(cell, "generate")
    m = build(cell, bb)
    rows = sources(cell, bb.tokenizer)
    expected = []
    for ids, flags in rows:
        x, soft, new = torch.tensor([ids]), None if flags is None else torch.tensor([flags]), []
        for _ in range(5):
            new.append(int(next_logprobs(cell, m, x, torch.ones_like(x), soft, new).argmax()))
        expected.append(new)
    assert len({tuple(e) for e in expected}) > 1  # the input steers decoding (flat logits would not)
    for side in ("left", "right") if cell.kind == "seq2seq" else ("left",):
        assert generate(m, source_batch(bb.tokenizer, rows, side), max_new_tokens=5, num_beams=1).tolist() == expected
    if m.num_virtual_tokens:  # and the method's virtual positions do: the plain backbone continues otherwise
        plain = source_batch(bb.tokenizer, [(ids, None) for ids, _ in rows], "left")  # soft positions: filler ids
        assert generate(methods.build("hard-prompt", bb), plain, max_new_tokens=5, num_beams=1).tolist() != expected


@pytest.mark.parametrize("cell", GENERATION_CELLS, ids=str)
def test_beam_search_returns_the_best_path_it_can_see(cell):
    bb = fresh(cell, "generate")
    m = build(cell, bb)
    rows = sources(cell, bb.tokenizer)
    batch = source_batch(bb.tokenizer, rows, "left")
    beams = generate(m, batch, max_new_tokens=2, num_beams=3)
    two = generate(m, batch, max_new_tokens=2, num_beams=3, num_return_sequences=2)
    assert beams.shape == (len(rows), 2) and two.shape == (2 * len(rows), 2) and torch.equal(two[::2], beams)
    soft = batch.get("soft_mask")
    for i in range(len(rows)):
        row = (batch["input_ids"][i:i + 1], batch["attention_mask"][i:i + 1], None if soft is None else soft[i:i + 1])
        assert beams[i].tolist() == best_of_two_step_beam(lambda new: next_logprobs(cell, m, *row, new), 3)


# -- (g): a device computes what the CPU computes ------------------------------------------------
# Where CUDA is (scripts/gpu_check.sh runs this on a GPU machine), each forward cell's outputs, loss
# and trained tensors' gradients there == on the CPU, fp32 (PyTorch leaves TF32 off for matmuls), to
# 1e-4 relative. PTUNE_CONTRACT_DEVICE names the device (gpu_check.sh --cpu: `cpu`, which proves the
# check runs end to end, not that two devices agree).
DEVICE = os.environ.get("PTUNE_CONTRACT_DEVICE") or ("cuda" if torch.cuda.is_available() else "")


@pytest.mark.skipif(not DEVICE, reason="no CUDA device here; scripts/gpu_check.sh runs it on a GPU machine")
@pytest.mark.parametrize("cell", FORWARD_CELLS, ids=str)
def test_a_device_computes_what_the_cpu_computes(cell):
    results = []
    for device in ("cpu", DEVICE):
        bb = fresh(cell, "outputs")
        m = build(cell, bb)
        bb.model.to(device)
        m.to(device)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch_of(bb.tokenizer, examples(cell, bb.tokenizer)).items()}
        out, keep = outputs(cell, m, batch)
        loss, n = task_loss(cell, m, batch)
        if m.trains:
            (loss / n).backward()
        grads = {k: t.grad.detach().cpu() for k, t in m.trainable_tensors().items() if t.grad is not None}
        results.append((out.detach()[keep].cpu(), loss.detach().cpu() / n, grads))
    (out_a, loss_a, grads_a), (out_b, loss_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-4, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and bool(grads_a) == m.trains
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-3, atol=1e-5, msg=lambda s, k=k: f"{k}: {s}")


# -- the parametrization leaves nothing out ----------------------------------------------------------
def test_the_contract_covers_every_method_and_tiny_backbone():
    assert set(VARIANTS) == set(methods.METHODS), "a registered method is missing from VARIANTS"
    assert set(BACKBONES) == set(KIND), "a conf/model/tiny-*.yaml backbone is missing from BACKBONES"
    every = {(m, b) for m in methods.METHODS for b in KIND}
    for cells in (CELLS, FORWARD_CELLS):
        assert {(c.method, c.backbone) for c in cells} == every
    assert {(c.method, c.backbone) for c in GENERATION_CELLS} == {(m, b) for m, b in every if KIND[b] in GENERATES}
    assert {c.variant.label for c in GENERATION_CELLS if c.method == "p-tuning"} == {"lstm", "soft"}
    masked = [b for b in BACKBONES if KIND[b] not in GENERATES]  # the linear head on every method that trains
    assert {(c.method, c.backbone) for c in CELLS if c.head == "linear"} >= {(m, b) for m, b in every if b in masked} - \
        {("hard-prompt", b) for b in masked}
    assert all(fall_of(c) > 0 for c in CELLS if c.method != "hard-prompt")  # a bar for every cell that trains
