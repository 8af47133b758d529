"""Level 2 (+ a level-4 resume check): prompt tuning on tiny decoder-only backbones (GPT-2, Llama):
counts, PEFT's prompt tuning, the initialisations. What every method proves on every backbone
(frozen weights, a falling loss, the adapter round trip, padding, greedy and beam): test_contract.py."""

import json

import pytest
import torch

from conftest import TINY, assert_same_summary, assert_same_tensors, crash_after_checkpoint, load, peft_greedy
from ptune.adapter import save_adapter, load_adapter
from ptune import methods
from ptune.cli import main
from ptune.errors import PtuneError
from ptune.methods.prompt import common_token_ids

BACKBONES = ["tiny-gpt2", "tiny-llama"]


def logits(method, input_ids, attention_mask):
    """(batch, p + seq, vocab): virtual positions included."""
    return method.backbone.model(**method.model_inputs(input_ids, attention_mask)).logits


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


def test_an_adapter_of_another_length_is_refused(backbone, tmp_path):
    m = prompt(backbone)
    save_adapter(tmp_path / "adapter", m.adapter_tensors(), m.adapter_config())
    _, tensors = load_adapter(tmp_path / "adapter")
    with pytest.raises(PtuneError, match="num_virtual_tokens"):
        prompt(backbone, p=6).load_adapter_tensors(tensors)


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

    restore = crash_after_checkpoint(monkeypatch, 3)  # "kill" the run right after its step-3 checkpoint
    assert train() == 130
    restore()
    broken = next(p for p in (in_tmp / "outputs").glob("*/*") if p.is_dir() and p != full)
    assert main(["train", f"resume={broken}"]) == 0
    assert_same_tensors(full, broken, ("adapter/adapter_model.safetensors", "checkpoints/step-6/trainable.safetensors",
                                       "checkpoints/step-6/optimizer.safetensors"))
    assert_same_summary(full, broken)
