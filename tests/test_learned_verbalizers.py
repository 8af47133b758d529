"""Verbalizers beyond a word list: the soft verbalizer (WARP, ptune/heads/soft_verbalizer.py), the
prototypical verbalizer (ProtoVerb, ptune/heads/proto_verbalizer.py), contextual calibration
(ptune/heads/calibration.py), and prompt tuning's label init scoring the verbalizer's own pieces.

Scores and losses are recomputed by hand from the plain model's states; the CLI round trip, mixed
batches and refusals run on tiny models."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import build_pool, randomize
from ptune.heads import calibration
from ptune.build import build
from ptune.cli import compose, main
from ptune.data import collate
from ptune.heads import loss as head_loss
from ptune.heads.proto_verbalizer import cosine, losses, zscore_mean

ROWS = [{"sentence": "a gorgeous , witty , seductive movie .", "label": 1}, {"sentence": "dull", "label": 0},
        {"sentence": "the plot is nothing but boilerplate clichés", "label": 0}]
FROZEN = ["method=fine-tune", "method.trainable=head"]  # the plain model's forward: states by hand are the model's


def setup(model, *overrides):
    kind = ["model=tiny-bert", "model.kind=encoder"] if model == "encoder" else [f"model={model}"]
    return build(compose([*kind, "task=sst2", "task.max_train_samples=8", *overrides]))


def batch_of(task, tok, rows, side="right"):
    return collate(task.examples(tok, rows), tok.pad_token_id, padding_side=side)


@torch.no_grad()
def plain(backbone, task, row, what):
    """By hand, for one row: the LM's logits ("logits") or last hidden state ("hidden") at the
    position that predicts {mask}, read from full forwards of the plain model."""
    model, tok, kind = backbone.model, backbone.tokenizer, backbone.kind
    e = task.examples(tok, [row])[0]
    ids, pos = e.input_ids, e.mask_pos
    if kind == "causal":
        out = model(input_ids=torch.tensor([ids[:pos]]), output_hidden_states=True)
        return (out.logits if what == "logits" else out.hidden_states[-1])[0, -1]
    if kind == "seq2seq":  # the tiny T5's borrowed tokenizer has no mask token nor sentinel: the slot is left out
        enc = torch.tensor([ids[:pos] + ids[pos + 1:]])
        dec = torch.tensor([[model.config.decoder_start_token_id]])
        out = model(input_ids=enc, decoder_input_ids=dec, output_hidden_states=True)
        return (out.logits if what == "logits" else out.decoder_hidden_states[-1])[0, -1]
    if kind == "encoder":
        return model(input_ids=torch.tensor([ids])).last_hidden_state[0, pos]
    out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return (out.logits if what == "logits" else out.hidden_states[-1])[0, pos]


# -- the soft verbalizer (WARP) ------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-bert", "tiny-t5"])
def test_soft_verbalizer_starts_as_the_lm_scoring_its_label_words(model):
    """Init: class c = its words' output embeddings (mean over pieces): the head's logits are then
    the mean over the word's pieces of the LM's own logits at the mask (output bias included)."""
    backbone, method, task = setup(model, "task.head=soft-verbalizer", *FROZEN)
    head, tok = method.head, backbone.tokenizer
    assert head.space == "output"
    got = head.scores(method, batch_of(task, tok, ROWS))
    for r, row in enumerate(ROWS):
        logits = plain(backbone, task, row, "logits")
        want = [logits[list(ws[0])].mean() for ws in head.words]  # one word per class in sst2
        torch.testing.assert_close(got[r], torch.stack(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["tiny-bert", "encoder"])
def test_soft_verbalizer_logits_by_hand(model):
    """logits = h W^T + b, h: BERT's MLM transform of the [MASK] state; an encoder's hidden state (random init)."""
    backbone, method, task = setup(model, "task.head=soft-verbalizer", *FROZEN)
    head = method.head
    randomize(head, 3)
    got = head.scores(method, batch_of(task, backbone.tokenizer, ROWS))
    for r, row in enumerate(ROWS):
        h = plain(backbone, task, row, "hidden")
        if model == "tiny-bert":
            h = backbone.model.cls.predictions.transform(h)
        torch.testing.assert_close(got[r], h @ head.weight.T + head.bias, rtol=1e-5, atol=1e-5)
    if model == "encoder":
        assert head.space == "hidden" and head.init.startswith("random")
        fresh = setup(model, "task.head=soft-verbalizer", *FROZEN)[1].head
        assert fresh.weight.std().item() == pytest.approx(0.02, rel=0.3) and not fresh.bias.any()


# -- the prototypical verbalizer (ProtoVerb) -------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny-gpt2", "encoder", "tiny-t5"])
def test_proto_scores_are_cosines_of_the_projected_mask_state(model):
    backbone, method, task = setup(model, "task.head=proto-verbalizer", "task.proto_dim=5", *FROZEN)
    head = method.head
    assert head.proj.weight.shape == (5, backbone.dims.hidden) and head.prototypes.shape == (2, 5)
    got = head.scores(method, batch_of(task, backbone.tokenizer, ROWS))
    for r, row in enumerate(ROWS):
        v = head.proj.weight @ plain(backbone, task, row, "hidden")
        want = [torch.dot(v, c) / (v.norm() * c.norm()) for c in head.prototypes]
        torch.testing.assert_close(got[r], torch.stack(want), rtol=1e-5, atol=1e-5)


def test_proto_losses_by_hand():
    """Three instances, labels (0, 0, 1): the instance-prototype and instance-instance InfoNCE terms."""
    v = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.5]])
    c = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    y = torch.tensor([0, 0, 1])
    proto, inst = losses(v, c, y)

    def cos(a, b):
        return float(torch.dot(a, b) / (a.norm() * b.norm()))

    for i in range(3):
        num = math.exp(cos(v[i], c[y[i]]))
        assert proto[i].item() == pytest.approx(-math.log(num / sum(math.exp(cos(v[i], cn)) for cn in c)), rel=1e-5)
        positives = [j for j in range(3) if y[j] == y[i]]  # i itself included (the authors' code)
        neg = sum(math.exp(cos(v[i], v[k])) for k in range(3) if y[k] != y[i])
        want = sum(-math.log(math.exp(cos(v[i], v[j])) / (math.exp(cos(v[i], v[j])) + neg)) for j in positives)
        assert inst[i].item() == pytest.approx(want / len(positives), rel=1e-5)
    # one class only (no negatives): finite, zero instance-instance loss
    one = v[:2].clone().requires_grad_(True)
    p1, i1 = losses(one, c, y[:2])
    (p1 + i1).sum().backward()
    assert torch.isfinite(one.grad).all() and torch.allclose(i1, torch.zeros(2), atol=1e-6)


def test_proto_training_loss_and_its_combination_with_the_manual_verbalizer():
    backbone, method, task = setup("tiny-bert", "task.head=proto-verbalizer", "task.proto_combine=true", *FROZEN)
    head, tok = method.head, backbone.tokenizer
    batch = batch_of(task, tok, ROWS)
    total, n = head_loss(method, batch)
    v = head.proj(head.states(method, batch))
    proto, inst = losses(v, head.prototypes, batch["labels"])
    words = head.manual.scores(method, batch)  # the word verbalizer's log P(label words)
    ce = F.cross_entropy(words, batch["labels"], reduction="sum")
    assert n == 3 and total.item() == pytest.approx((proto + inst).sum().item() + ce.item(), rel=1e-5)
    total.backward()
    assert head.prototypes.grad.abs().sum() > 0 and head.proj.weight.grad.abs().sum() > 0
    # scores: the mean of the two z-scored (unbiased std over the classes) score vectors
    sims = cosine(v, head.prototypes)
    z = lambda s: (s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True)  # noqa: E731
    torch.testing.assert_close(head.scores(method, batch), (z(words) + z(sims)) / 2)
    # two classes: z-scores are +-1/sqrt(2), so the combination is +-1/sqrt(2) (agree) or 0 (a tie)
    both = zscore_mean(torch.tensor([[0.0, 3.0], [0.0, 3.0]]), torch.tensor([[0.1, 0.2], [0.2, 0.1]]))
    torch.testing.assert_close(both, torch.tensor([[-2 ** -0.5, 2 ** -0.5], [0.0, 0.0]]))


# -- contextual calibration ------------------------------------------------------------------------------
def test_calibration_divides_by_the_content_free_probabilities_and_renormalises():
    scores = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, -1.0]])
    p_cf = torch.tensor([0.5, 0.3, 0.2])
    p = scores.softmax(-1)
    q = (p / p_cf) / (p / p_cf).sum(-1, keepdim=True)
    torch.testing.assert_close(calibration.calibrate(scores, p_cf).exp(), q)


@pytest.mark.parametrize("head", ["verbalizer", "soft-verbalizer", "proto-verbalizer"])
def test_calibrated_class_scores_by_hand_and_recomputed_when_the_model_changes(head):
    backbone, method, task = setup("tiny-gpt2", f"task.head={head}", "task.calibrate=true", "method=prompt",
                                   "method.num_virtual_tokens=2")
    raw = task.class_scores(method, ROWS, 8, calibrated=False)
    free = [{"sentence": s, "label": 0} for s in ("N/A", "", "[MASK]")]
    p_cf = task.class_scores(method, free, 8, calibrated=False).softmax(-1).mean(0)
    p = raw.softmax(-1)
    want = (p / p_cf) / (p / p_cf).sum(-1, keepdim=True)
    torch.testing.assert_close(task.class_scores(method, ROWS, 8).exp(), want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        method.prompt.mul_(-3.0)  # an optimizer step changes the model state: p_cf is computed again
    p_cf2 = task.class_scores(method, free, 8, calibrated=False).softmax(-1).mean(0)
    assert not torch.equal(p_cf, p_cf2)
    assert torch.equal(calibration.content_free_probs(task, method, 8), p_cf2)


# -- batches -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, overrides", [
    ("tiny-gpt2", ["task.head=soft-verbalizer", "method=prompt"]),
    ("tiny-bert", ["task.head=soft-verbalizer", "method=prefix"]),
    ("tiny-t5", ["task.head=proto-verbalizer", "method=prompt"]),
    ("encoder", ["task.head=proto-verbalizer", "method=p-tuning-v2"]),
])
def test_left_and_right_padded_batches_score_alike(model, overrides):
    backbone, method, task = setup(model, *overrides, "method.num_virtual_tokens=3")
    randomize(method, 1)
    tok = backbone.tokenizer
    right, left = (method.head.scores(method, batch_of(task, tok, ROWS, side)) for side in ("right", "left"))
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-bert"])
def test_mixed_batches_equal_each_adapter_alone(model):
    pool = build_pool(model, {
        "soft": ["task=sst2", "task.head=soft-verbalizer", "method=prompt", "method.num_virtual_tokens=3"],
        "proto": ["task=sst2", "task.head=proto-verbalizer", "method=prefix", "method.num_virtual_tokens=2"],
        "both": ["task=sst2", "task.head=proto-verbalizer", "task.proto_combine=true", "task.calibrate=true",
                 "method=prompt", "method.num_virtual_tokens=2"],
        "words": ["task=sst2", "task.head=verbalizer", "task.calibrate=true", "method=p-tuning-v2",
                  "method.num_virtual_tokens=2"],
        "linear": ["task=sst2", "task.head=linear", "method=prompt", "method.num_virtual_tokens=1"],
    })
    rows = [{"sentence": r["sentence"], "adapter": name} for name in pool.names for r in ROWS]
    mixed = pool.class_scores(rows[::-1])[::-1]  # another order in the batch
    alone = torch.cat([pool.alone(name)[1].class_scores(pool.alone(name)[0], ROWS, 8) for name in pool.names])
    torch.testing.assert_close(torch.stack(mixed).float().cpu(), alone, rtol=1e-4, atol=1e-5)
    labels = ["negative", "positive"]
    clear = (alone[:, 0] - alone[:, 1]).abs() > 1e-4  # two-class ProtoVerb + words: a disagreement is a tie
    got = pool.predict(rows)
    assert [g for g, c in zip(got, clear) if c] == [labels[i] for i, c in zip(alone.argmax(-1), clear) if c]


# -- every method, the run directory and the CLI ----------------------------------------------------------
@pytest.mark.parametrize("head", ["soft-verbalizer", "proto-verbalizer"])
@pytest.mark.parametrize("model, method", [
    ("tiny-gpt2", "prompt"), ("tiny-gpt2", "prefix"), ("tiny-gpt2", "p-tuning"), ("tiny-gpt2", "p-tuning-v2"),
    ("tiny-gpt2", "fine-tune"), ("tiny-bert", "p-tuning"), ("tiny-t5", "p-tuning-v2"), ("encoder", "prompt"),
])
def test_every_method_trains_the_head_and_its_own_tensors(model, method, head):
    size = [] if method == "fine-tune" else ["method.num_virtual_tokens=2"]
    backbone, m, task = setup(model, f"method={method}", f"task.head={head}", *size)
    total, _ = head_loss(m, batch_of(task, backbone.tokenizer, ROWS))
    total.backward()
    grads = {k: p.grad for k, p in m.trainable_tensors().items()}
    assert any(k.startswith("head.") for k in grads) and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def run_dir(root):
    [run] = [p for p in (root / "outputs").glob("*/*") if (p / "summary.json").exists()]
    return run


SMALL = ["task=sst2", "task.max_train_samples=16", "task.max_eval_samples=8", "trainer.batch_size=4",
         "trainer.max_steps=2", "trainer.eval_every=2", "trainer.save_every=2", "trainer.eval_batch_size=8"]


@pytest.mark.parametrize("model, overrides, tensors", [
    ("tiny-gpt2", ["task.head=soft-verbalizer", "task.calibrate=true", "method=prompt"], {"head.weight", "head.bias"}),
    ("tiny-bert", ["task.head=proto-verbalizer", "task.proto_combine=true", "method=p-tuning-v2"],
     {"head.proj.weight", "head.prototypes"}),
])
def test_a_run_saves_its_head_and_ptune_eval_scores_it_again(in_tmp, data_dir, model, overrides, tensors):
    from safetensors.torch import load_file

    assert main(["train", f"model={model}", *overrides, "method.num_virtual_tokens=2", *SMALL]) == 0
    run = run_dir(in_tmp)
    saved = load_file(run / "adapter/adapter_model.safetensors")
    assert tensors <= set(saved) and tensors <= set(load_file(run / "checkpoints/step-2/trainable.safetensors"))
    config = json.loads((run / "adapter/adapter_config.json").read_text())
    assert config["head"]["kind"] == overrides[0].split("=")[1]
    assert ("calibration" in config["head"]) == ("task.calibrate=true" in overrides)
    summary = json.loads((run / "summary.json").read_text())
    assert main(["eval", f"run={run}"]) == 0  # a fresh backbone + the saved adapter and head: the same scores
    assert json.loads((run / "eval_dev.json").read_text())["metrics"] == summary["eval"]
    rows = in_tmp / "rows.jsonl"
    rows.write_text("".join(json.dumps({"sentence": r["sentence"]}) + "\n" for r in ROWS))
    assert main(["predict", f"run={run}", f"input={rows}", f"output={in_tmp / 'p.jsonl'}"]) == 0
    assert len((in_tmp / "p.jsonl").read_text().splitlines()) == 3


def test_an_ensemble_of_soft_verbalizer_runs_scores_each_member_as_alone(in_tmp, data_dir):
    from conftest import make_run

    base = ["task=sst2", "task.head=soft-verbalizer", "task.max_eval_samples=8", "method.num_virtual_tokens=2"]
    runs = [make_run(in_tmp / name, "tiny-gpt2", [*base, f"method={name}"], seed)
            for seed, name in enumerate(["prompt", "prefix"])]
    assert main(["eval", f"run={runs[0]},{runs[1]}", "ensemble=mean", f"out={in_tmp / 'e.json'}"]) == 0
    members = json.loads((in_tmp / "e.json").read_text())["members"]
    for run, member in zip(runs, members):
        assert main(["eval", f"run={run}"]) == 0
        assert json.loads((run / "eval_dev.json").read_text())["metrics"] == member["metrics"]


@pytest.mark.parametrize("argv, message", [
    (["model=tiny-gpt2", "method=hard-prompt", "task.head=soft-verbalizer"], "method=hard-prompt trains nothing"),
    (["model=tiny-bert", "method=hard-prompt", "task.head=proto-verbalizer"], "method.trainable=head"),
    (["model=tiny-bert", "model.kind=encoder", "task.head=proto-verbalizer", "task.proto_combine=true"],
     "task.proto_combine=true (the manual verbalizer"),
    (["model=tiny-bert", "task.head=linear", "task.calibrate=true"], "task.head=linear has no verbalizer"),
    (["model=tiny-bert", "task.head=verbalizer", "task.proto_combine=true"], "use task.head=proto-verbalizer"),
    (["model=tiny-bert", "task.head=soft-verbalizer", "task.template='{sentence}'"], "has no {mask}"),
    (["model=tiny-bert", "task.head=proto-verbalizer", "task.proto_dim=0"], "task.proto_dim=0 is invalid"),
    (["model=tiny-bert", "task.head=softverbalizer"], "soft-verbalizer, proto-verbalizer"),
])
def test_refusals_are_one_line_exit_2(in_tmp, data_dir, capsys, argv, message):
    if not any(a.startswith("method=") for a in argv):
        argv = [*argv, "method=prompt"]
    assert main(["train", "task=sst2", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (in_tmp / "outputs").exists()


# -- trainer.head_lr: the head's own tensors at their own rate ------------------------------------------------
@pytest.mark.parametrize("head_lr", [None, 0.5])
@pytest.mark.parametrize("head", ["soft-verbalizer", "proto-verbalizer", "linear"])
def test_head_lr_moves_the_head_at_its_rate_and_the_rest_at_lr(in_tmp, data_dir, head, head_lr):
    """Adam's first step moves a tensor by its lr times sign(grad), so after one step the largest
    change of the head's tensors is head_lr and of the prompt lr."""
    from safetensors.torch import load_file

    model = "tiny-bert" if head == "proto-verbalizer" else "tiny-gpt2"
    overrides = [f"model={model}", "method=prompt", "method.num_virtual_tokens=2", f"task.head={head}", *SMALL,
                 "trainer.max_steps=1", "trainer.schedule=constant", "trainer.lr=0.001", "trainer.max_grad_norm=0",
                 *([f"trainer.head_lr={head_lr}"] if head_lr else [])]
    _, m, _ = build(compose(overrides))
    start = {k: v.detach().clone() for k, v in m.trainable_tensors().items()}
    assert main(["train", *overrides]) == 0
    end = load_file(run_dir(in_tmp) / "adapter/adapter_model.safetensors")
    moved = {k: (end[k] - v).abs().max().item() for k, v in start.items()}
    want = {k: (head_lr or 0.001) if k.startswith("head.") else 0.001 for k in start}
    assert any(k.startswith("head.") for k in moved) and "prompt" in moved
    assert all(abs(moved[k] - want[k]) < 0.02 * want[k] for k in moved), (moved, want)


@pytest.mark.parametrize("argv, message", [
    (["method=prompt", "task.head=verbalizer", "trainer.head_lr=0.01"], "trainer.head_lr=0.01 is set, but this task head"),
    (["method=fine-tune", "task.head=verbalizer", "trainer.head_lr=0.01"], "trains no tensors of its own"),
    (["method=prompt", "task.head=linear", "trainer.head_lr=0"], "trainer.head_lr=0 is invalid: must be a number > 0"),
    (["method=prompt", "task.head=linear", "trainer.head_lr=fast"], "trainer.head_lr"),
])
def test_head_lr_refusals_are_one_line_exit_2(in_tmp, data_dir, capsys, argv, message):
    assert main(["train", "model=tiny-gpt2", "task=sst2", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (in_tmp / "outputs").exists()


# -- prompt tuning's class-label init ------------------------------------------------------------------------
def test_labels_init_embeds_the_pieces_the_verbalizer_scores():
    """Byte-level BPE: " terrible" (after the template's space) is not "terrible"; the init embeds the former."""
    backbone, method, task = setup("tiny-gpt2", "task.head=verbalizer", "method=prompt", "method.init=labels",
                                   "method.num_virtual_tokens=4")
    tok, table = backbone.tokenizer, backbone.model.get_input_embeddings().weight
    assert tok("terrible", add_special_tokens=False).input_ids != tok(" terrible", add_special_tokens=False).input_ids
    for i, ws in enumerate(method.head.words):  # the verbalizer's own pieces, per class
        ids = [t for w in ws for t in w]
        assert ids == tok(" " + task.verbalizer[i][0], add_special_tokens=False).input_ids
        assert torch.equal(method.prompt.detach()[i], table[ids].mean(0))
