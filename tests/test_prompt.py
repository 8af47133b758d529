"""Level 2 (+ a level-4 resume check): prompt tuning on tiny decoder-only backbones (GPT-2, Llama)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, peft_greedy
from ptune.adapter import save_adapter, load_adapter
from ptune import methods, models
from ptune.train import checkpoint
from ptune.cli import compose, main
from ptune.data import Example, collate
from ptune.errors import PtuneError
from ptune.heads import lm_loss
from ptune.methods.prompt import common_token_ids

BACKBONES = ["tiny-gpt2", "tiny-llama"]


# load, toy_batch and logits repeat tests/test_prefix.py's: a little duplication keeps each file standalone
def load(name):
    cfg = compose([f"model={name}"]).model
    return models.load(cfg.name, cfg.kind, cfg.source, tiny=dict(cfg.tiny), tokenizer=cfg.tokenizer)


def toy_batch(tok, texts=("name : Eagle | food : French", "name : Mill"), targets=(" The Eagle serves French food.", " The Mill.")):
    exs = []
    for s, t in zip(texts, targets):
        s_ids, t_ids = tok(s).input_ids, tok(t).input_ids + [tok.eos_token_id]
        exs.append(Example(s_ids + t_ids, [-100] * len(s_ids) + t_ids))
    return exs


def logits(method, input_ids, attention_mask):
    """(batch, p + seq, vocab): virtual positions included."""
    return method.backbone.model(**method.model_inputs(input_ids, attention_mask)).logits


@pytest.fixture(scope="module", params=BACKBONES)
def backbone(request):
    return load(request.param)


def prompt(backbone, p=5, **kw):
    torch.manual_seed(0)
    return methods.build("prompt", backbone, num_virtual_tokens=p, **kw)


def embed(backbone, ids):
    return backbone.model.get_input_embeddings().weight[torch.as_tensor(ids)]


def test_parameter_counts(backbone):
    m = prompt(backbone, p=7)
    hidden = backbone.dims.hidden
    assert sum(t.numel() for t in m.trainable_tensors().values()) == 7 * hidden  # p * hidden
    tensors = m.adapter_tensors()
    assert list(tensors) == ["prompt"] and tuple(tensors["prompt"].shape) == (7, hidden)
    assert list(m.trainable_tensors()) == ["prompt"]  # checkpoints and adapters share the name


def test_training_touches_only_the_prompt_and_loss_falls(backbone):
    m = prompt(backbone)
    frozen = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    batch = collate(toy_batch(backbone.tokenizer), backbone.tokenizer.pad_token_id)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss, n = lm_loss(m, **batch)
        (loss / n).backward()
        assert all(p.grad is None for p in backbone.model.parameters())
        assert m.prompt.grad is not None and m.prompt.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        losses.append(loss.item() / n)
    # A soft prompt reaches the real tokens only through attention over LayerNorm'ed (scale-free)
    # inputs, so on these random 2-layer models it moves the loss far less than a prefix does (~1
    # nat): measured drops 0.08 (GPT-2) and 0.16 (Llama) nats in 30 steps, plateau 0.10 / 0.18 after
    # 200 steps at any lr in 1e-2..1. Initial prompts (vocab vs random) differ by 0.01-0.03 nats, so 0.05 is
    # learning, not noise; the 0.5-nat bar of test_prefix.py is out of this method's reach here.
    assert losses[-1] < losses[0] - 0.05
    for k, v in backbone.model.state_dict().items():
        assert torch.equal(v, frozen[k]), f"frozen weight {k} changed"


def test_adapter_roundtrip_gives_identical_logits(backbone, tmp_path):
    m = prompt(backbone)
    with torch.no_grad():
        m.prompt.add_(torch.randn_like(m.prompt) * 0.1)
    save_adapter(tmp_path / "adapter", m.adapter_tensors(), m.adapter_config())
    m2 = prompt(load(backbone.name), init="random")  # different starting values, then the adapter
    _, tensors = load_adapter(tmp_path / "adapter")
    m2.load_adapter_tensors(tensors)
    assert not list(m2.trainable_tensors())  # the loaded prompt is for inference only
    batch = collate(toy_batch(backbone.tokenizer), backbone.tokenizer.pad_token_id)
    with torch.no_grad():
        a = logits(m, batch["input_ids"], batch["attention_mask"])
        b = logits(m2, batch["input_ids"], batch["attention_mask"])
    assert torch.equal(a, b)
    with pytest.raises(PtuneError, match="num_virtual_tokens"):
        prompt(backbone, p=6).load_adapter_tensors(tensors)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_logits(backbone, side):
    m = prompt(backbone)
    exs = toy_batch(backbone.tokenizer)
    pad = backbone.tokenizer.pad_token_id
    batch = collate(exs, pad, padding_side=side)
    with torch.no_grad():
        full = logits(m, batch["input_ids"], batch["attention_mask"])[:, m.p:]  # real positions only
        for i, e in enumerate(exs):
            alone = collate([e], pad)
            ref = logits(m, alone["input_ids"], alone["attention_mask"])[0, m.p:]
            rows = batch["attention_mask"][i].bool()
            torch.testing.assert_close(full[i][rows], ref, atol=1e-5, rtol=1e-5)


def test_generate_matches_step_by_step_greedy(backbone):
    m = prompt(backbone)
    tok = backbone.tokenizer
    exs = toy_batch(tok)
    batch = collate(exs, tok.pad_token_id, padding_side="left")
    new = m.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=5, do_sample=False,
                     num_beams=1, eos_token_id=None, pad_token_id=tok.pad_token_id)
    assert new.shape == (2, 5)  # new tokens only
    for i, e in enumerate(exs):
        seq = torch.tensor([e.input_ids])
        for _ in range(5):
            with torch.no_grad():
                nxt = logits(m, seq, torch.ones_like(seq))[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], 1)
        assert new[i].tolist() == seq[0, len(e.input_ids):].tolist()


def best_of_two_step_beam(next_logprobs, k: int) -> list[int]:
    """What width-k beam search over two new tokens must return, found by hand: the best two-token
    continuation of the k best first tokens (beam search keeps exactly those after step one).
    next_logprobs(prefix) -> (vocab,) log-probs of the token after the new tokens `prefix`.
    (Beam search need not beat greedy: greedy's prefix can fall out of the beam.)"""
    first = next_logprobs([])
    paths = []
    for t in first.topk(k).indices.tolist():
        second = next_logprobs([t])
        paths.append(((first[t] + second.max()).item(), [t, second.argmax().item()]))
    return max(paths)[1]


def test_beam_search_through_inputs_embeds(backbone):
    """Width-3 beam search over two steps returns the best path it can see (computed by hand, from
    left-padded rows); num_return_sequences gives the beams in order."""
    m = prompt(backbone)
    tok = backbone.tokenizer
    batch = collate(toy_batch(tok), tok.pad_token_id, padding_side="left")
    kw = dict(max_new_tokens=2, num_beams=3, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    beams = m.generate(batch["input_ids"], batch["attention_mask"], **kw)
    two = m.generate(batch["input_ids"], batch["attention_mask"], num_return_sequences=2, **kw)
    assert beams.shape == (2, 2) and two.shape == (4, 2) and torch.equal(two[::2], beams)
    for i in range(2):
        def next_logprobs(prefix, i=i):
            ids = torch.cat([batch["input_ids"][i], torch.tensor(prefix, dtype=torch.long)]).view(1, -1)
            mask = torch.cat([batch["attention_mask"][i], torch.ones(len(prefix), dtype=torch.long)]).view(1, -1)
            with torch.no_grad():
                return logits(m, ids, mask)[0, -1].log_softmax(-1)
        assert beams[i].tolist() == best_of_two_step_beam(next_logprobs, 3)


@pytest.mark.parametrize("name", BACKBONES)
def test_matches_peft_prompt_tuning(name):
    """PEFT's PromptTuning given the same tensor gives the same logits and greedy tokens; export is a rename."""
    peft = pytest.importorskip("peft")
    bb = load(name)
    m = prompt(bb, p=4, init="random")
    pm = peft.get_peft_model(load(name).model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(m.adapter_tensors()["prompt"])
    exported = {"prompt_embeddings": m.adapter_tensors()["prompt"]}  # the rename
    saved = peft.get_peft_model_state_dict(pm)
    assert saved.keys() == exported.keys() and torch.equal(saved["prompt_embeddings"], exported["prompt_embeddings"])

    tok = bb.tokenizer
    ids = torch.tensor([tok("name : Eagle | food : French. The Eagle").input_ids])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = logits(m, ids, mask)
        theirs = pm(input_ids=ids, attention_mask=mask).logits
    assert theirs.shape[1] == 4 + ids.shape[1]  # PEFT's logits include the virtual positions, as ours do
    assert (ours[:, 4:] - theirs[:, 4:]).abs().max().item() <= 1e-5
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    assert m.generate(ids, mask, **kw).tolist() == peft_greedy(pm, ids, 5)  # PEFT's model, decoded step by step


# -- initialisation ------------------------------------------------------------------------------
def test_random_init_is_uniform_half(backbone):
    w = prompt(backbone, p=50, init="random").prompt.detach()
    assert w.abs().max() <= 0.5 and w.min() < -0.45 and w.max() > 0.45  # U(-0.5, 0.5), as the paper
    assert torch.equal(w, prompt(backbone, p=50, init="random").prompt.detach())  # from the run's seed


def test_vocab_init_samples_the_5000_most_common_tokens(backbone):
    tok = backbone.tokenizer
    pool = common_token_ids(tok, len(tok))
    # SmolLM2's tokenizer: ids 0-16 are special/added, then the byte alphabet and merges in merge order
    assert pool.tolist() == list(range(17, 5017))
    m = prompt(backbone, p=30)  # init=vocab is the default
    torch.manual_seed(0)
    ids = pool[torch.randperm(len(pool))[:30]]  # without replacement, as the authors' code
    assert torch.equal(m.prompt.detach(), embed(backbone, ids))


def test_text_init_copies_token_embeddings(backbone):
    tok = backbone.tokenizer
    ids = tok("Describe the restaurant", add_special_tokens=False).input_ids
    long = prompt(backbone, p=2 * len(ids) + 1, init="text", init_text="Describe the restaurant").prompt.detach()
    assert torch.equal(long, embed(backbone, (ids * 3)[:2 * len(ids) + 1]))  # repeated
    short = prompt(backbone, p=2, init="text", init_text="Describe the restaurant").prompt.detach()
    assert torch.equal(short, embed(backbone, ids[:2]))  # cut


@pytest.mark.parametrize("kw, words", [
    (dict(init="labels"), "label words of a classification task"),
    (dict(init="text"), "method.init_text"),
    (dict(init="text", init_text=""), "method.init_text"),
    (dict(init="sampled"), "vocab, text, random, labels"),
])
def test_bad_init_fails_clearly(backbone, kw, words):
    with pytest.raises(PtuneError, match=words):
        prompt(backbone, **kw)


# -- level 4: through the CLI ---------------------------------------------------------------------
def test_resumed_equals_uninterrupted(in_tmp, data_dir, monkeypatch):
    def train(*extra):
        return main(["train", "method=prompt", "model=tiny-gpt2", "method.num_virtual_tokens=4", *TINY,
                     "task.metrics=[bleu]", "task.max_new_tokens=4", "task.max_eval_samples=2", *extra])  # lighter eval

    assert train() == 0
    [full] = sorted(p for p in (in_tmp / "outputs").glob("*/*") if p.is_dir())
    summary = json.loads((full / "summary.json").read_text())
    assert summary["trainable_params"] == summary["stored_params"] == 4 * 64  # p * hidden of tiny-gpt2

    real_save = checkpoint.save_checkpoint

    def save_then_crash(root, step, *a, **kw):  # "kill" the run right after its step-3 checkpoint
        path = real_save(root, step, *a, **kw)
        if step == 3:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    assert train() == 130
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    broken = next(p for p in (in_tmp / "outputs").glob("*/*") if p.is_dir() and p != full)
    assert main(["train", f"resume={broken}"]) == 0
    for name in ("adapter/adapter_model.safetensors", "checkpoints/step-6/trainable.safetensors",
                 "checkpoints/step-6/optimizer.safetensors"):
        a, b = load_file(full / name), load_file(broken / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    s_full, s_broken = (json.loads((r / "summary.json").read_text()) for r in (full, broken))
    for key in ("steps", "final_train_loss", "eval", "best", "train_tokens"):
        assert s_full[key] == s_broken[key], key
