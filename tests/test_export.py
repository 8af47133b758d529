"""`ptune export format=peft`: runs trained through the CLI load with peft.PeftModel.from_pretrained
and give ptune's logits; what PEFT cannot express is refused in one line with nothing written.

The base model PEFT wraps is rebuilt the way ptune builds it (`models.load` with the run's model
config and init_seed): the tiny models are random, so the same seed gives the same weights, which
the logits comparison itself checks.
"""

import dataclasses
import importlib
import json
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import TINY, peft_greedy
import ptune.infer.export
from ptune import methods, models
from ptune.cli import compose, main
from ptune.data import Example, collate
from ptune.errors import PtuneError
from ptune.infer.export import to_peft
from ptune.tasks.e2e import E2E
from ptune.build import load_run, load_trained as _load_for_inference

peft = pytest.importorskip("peft")  # a test dependency only: ptune.export never imports it

P = 4
FAST = [*TINY, "trainer.max_steps=1", "trainer.eval_every=1", "trainer.save_every=1", "task.max_eval_samples=1",
        "task.max_new_tokens=2", f"method.num_virtual_tokens={P}"]
CASES = {  # name: (ptune overrides, the PEFT config class and the keys that must hold these values)
    "prompt": (["method=prompt"], "PromptTuningConfig", dict(prompt_tuning_init="SAMPLE_VOCAB")),
    "prefix": (["method=prefix"], "PrefixTuningConfig", dict(prefix_projection=False)),  # trained with the MLP
    "p-tuning-lstm": (["method=p-tuning", "method.encoder_hidden_size=32"], "PromptEncoderConfig",  # PEFT counts
                      dict(encoder_reparameterization_type="LSTM", encoder_hidden_size=16)),  # units per direction
    "p-tuning-mlp": (["method=p-tuning", "method.encoder=mlp"], "PromptEncoderConfig",
                     dict(encoder_reparameterization_type="MLP", encoder_hidden_size=64)),
    # P-tuning v2 with the LM head: prefix-tuning's computation, no MLP by default (prefix dropout 0.1 in training)
    "p-tuning-v2": (["method=p-tuning-v2"], "PrefixTuningConfig", dict(prefix_projection=False)),
    "p-tuning-v2-projection": (["method=p-tuning-v2", "method.projection=true"], "PrefixTuningConfig",
                               dict(prefix_projection=False)),  # trained through the MLP, exported collapsed
}
PREFIX_CASES = ("prefix", "p-tuning-v2", "p-tuning-v2-projection")  # key/value prefixes: PEFT's PREFIX_TUNING
MLP_CASES = ("prefix", "p-tuning-v2-projection")
RUNS = [("tiny-gpt2", "prompt"), ("tiny-llama", "prompt"), ("tiny-gpt2", "prefix"), ("tiny-llama", "prefix"),
        ("tiny-gpt2", "p-tuning-mlp"), ("tiny-llama", "p-tuning-lstm"),
        ("tiny-gpt2", "p-tuning-v2"), ("tiny-llama", "p-tuning-v2-projection"),
        ("tiny-t5", "prompt"), ("tiny-bart", "p-tuning-lstm")]  # encoder prompts: PEFT's SEQ_2_SEQ_LM


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def train(outputs, model, overrides):
    """Train one tiny run through the CLI; returns its run directory."""
    before = set(outputs.glob("*/*"))
    assert main(["train", f"model={model}", f"output_dir={outputs}", *FAST, *overrides]) == 0
    [run] = set(outputs.glob("*/*")) - before
    return run


@pytest.fixture(scope="module")
def ptuning_run(outputs):
    return train(outputs, "tiny-gpt2", ["method=p-tuning"])


def base_model(cfg):
    """The backbone ptune trained on, rebuilt from the run's model config (same seed, same weights)."""
    m = cfg.model
    return models.load(m.name, m.kind, m.source, tiny=OmegaConf.to_container(m.tiny), tokenizer=m.tokenizer,
                       seed=m.init_seed).model


def examples(tok):
    texts = ("name : Eagle | food : French. The Eagle serves", "name : Mill")
    return [Example(tok(t).input_ids, tok(t).input_ids) for t in texts]


@pytest.mark.parametrize("model, case", RUNS)
def test_export_loads_in_peft_with_ptune_logits(outputs, model, case, capsys):
    overrides, config_class, expected = CASES[case]
    run = train(outputs, model, overrides)
    out = run.parent / f"{run.name}-peft"
    capsys.readouterr()
    assert main(["export", f"run={run}", "format=peft", f"out={out}"]) == 0
    assert f"exported: {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        assert list(f.keys()) == ["prompt_embeddings"] and f.metadata() == {"format": "pt"}
    [own] = load_file(run / "adapter/adapter_model.safetensors").values()  # prompt, or the collapsed prefix
    exported = load_file(out / "adapter_model.safetensors")["prompt_embeddings"]
    assert torch.equal(exported, own)
    checkpointed = load_file(run / "checkpoints/step-1/trainable.safetensors")
    if case in MLP_CASES:  # trained through the MLP; the export is its output, not the MLP
        assert any(".mlp." in k for k in checkpointed)
    elif case == "p-tuning-v2":  # trained the prefix itself
        assert [k for k in checkpointed if k.startswith("prefixes.")] == ["prefixes.decoder.prefix"]
    written = json.loads((out / "adapter_config.json").read_text())
    assert {k: written[k] for k in expected} == expected

    run_dir, cfg = load_run(run)
    seq2seq = cfg.model.kind == "seq2seq"
    theirs = peft.PeftModel.from_pretrained(base_model(cfg), str(out))
    config = theirs.peft_config["default"]
    assert type(config).__name__ == config_class and config.num_transformer_submodules == 1
    assert config.task_type == ("SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM")
    # PEFT derives its own view of the model on load (e.g. the prefix width under grouped-query
    # attention); saved again by PEFT, the adapter is the one ptune wrote, key for key
    theirs.save_pretrained(outputs / f"resaved-{model}-{case}")
    assert json.loads((outputs / f"resaved-{model}-{case}/adapter_config.json").read_text()) == written
    assert torch.equal(load_file(outputs / f"resaved-{model}-{case}/adapter_model.safetensors")["prompt_embeddings"],
                       exported)

    backbone, method, _ = _load_for_inference(run_dir, cfg)  # ptune's eval/predict path
    tok = backbone.tokenizer
    decoder = {}
    if seq2seq:  # the decoder reads a start token and three more
        decoder["decoder_input_ids"] = torch.tensor([[backbone.model.config.decoder_start_token_id, 5, 6, 7]] * 2)
    for side in ("right", "left"):
        batch = collate(examples(tok), tok.pad_token_id, padding_side=side)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        kw = {}
        if side == "left":  # PEFT counts pads in positions; only a prefix can be told not to (PEFT adds p)
            if case not in PREFIX_CASES:
                continue
            kw = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
        with torch.no_grad():
            a = backbone.model(**method.model_inputs(ids, mask), **decoder).logits
            b = theirs(input_ids=ids, attention_mask=mask, **kw, **decoder).logits
        assert a.shape == b.shape
        if seq2seq:  # decoder logits, (batch, 4, vocab)
            assert (a - b).abs().max().item() <= 1e-5
            continue
        n = a.shape[1] - ids.shape[1]  # prompts: p prepended positions in both
        assert (a[:, n:][mask.bool()] - b[:, n:][mask.bool()]).abs().max().item() <= 1e-5, side
        if n:
            assert (a[:, :n] - b[:, :n]).abs().max().item() <= 1e-5

    # greedy decoding agrees with PEFT's model, step by step through its full forward (PEFT's own
    # generate() is not the reference: under transformers 5.24 it decodes prompt tuning on GPT-2
    # differently from its own forward after the first token, a PEFT x transformers cache issue)
    ids = torch.tensor([examples(tok)[0].input_ids])
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=tok.pad_token_id,
              forced_eos_token_id=None)  # BART's config forces EOS as the last token; plain argmax here
    ours = method.generate(ids, torch.ones_like(ids), **kw)
    assert ours.tolist() == peft_greedy(theirs, ids, 4, backbone.model.config.decoder_start_token_id if seq2seq else None)


def fake_run(tmp_path, *overrides, task_head=None):
    """A run directory holding only config.yaml: every refusal comes before the adapter is read."""
    cfg = compose(list(overrides) + (["task=sst2", f"task.head={task_head}"] if task_head else []))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return run


def refused(capsys, tmp_path, run, *extra, out=None):
    """Exit 2, one `error:` line, and nothing at out or beside it."""
    out = out or tmp_path / "exported"
    siblings = set(out.parent.iterdir())
    capsys.readouterr()
    assert main(["export", f"run={run}", f"out={out}", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ptune export"), err
    assert set(out.parent.iterdir()) == siblings  # no out, no temporary directory
    return err[0]


@pytest.mark.parametrize("overrides, head, words", [
    (["method=fine-tune"], None, "method=fine-tune has no PEFT equivalent"),
    (["method=hard-prompt"], None, "method=hard-prompt has no PEFT equivalent"),
    (["method=prefix", "model=tiny-t5"], None, "encoder, decoder and cross-attention prefixes"),
    (["method=prefix", "model=tiny-bart"], None, "encoder, decoder and cross-attention prefixes"),
    (["method=prefix", "model=tiny-bert"], None, "model=tiny-bert is a masked model"),
    (["method=p-tuning-v2", "model=tiny-t5"], None, "method=p-tuning-v2 on model=tiny-t5 has encoder, decoder and cross"),
    (["method=p-tuning-v2", "model=tiny-bart"], None, "encoder, decoder and cross-attention prefixes"),
    (["method=p-tuning-v2", "model=tiny-gpt2"], "linear", "task.head=linear is a classification head"),
    (["method=p-tuning-v2", "model=tiny-bert"], "linear", "task.head=linear is a classification head"),
    (["method=prompt", "model=tiny-bert"], "linear", "task.head=linear is a classification head"),
    (["method=p-tuning", "model=tiny-gpt2"], "verbalizer", "task.head=verbalizer is a classification head"),
])
def test_no_peft_equivalent_is_refused(tmp_path, capsys, overrides, head, words):
    assert words in refused(capsys, tmp_path, fake_run(tmp_path, *overrides, task_head=head))


def test_bad_arguments_are_refused(tmp_path, capsys):
    run = fake_run(tmp_path, "method=prompt")
    assert "format='onnx' is not one of peft" in refused(capsys, tmp_path, run, "format=onnx")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    assert "exists and is not an empty directory" in refused(capsys, tmp_path, run, out=taken)
    assert (taken / "keep.txt").read_text() == "x" and len(list(taken.iterdir())) == 1
    assert main(["export", f"run={run}"]) == 2  # no out=
    assert "needs run=<run dir> and out=" in capsys.readouterr().err


def test_p_tuning_prompts_inside_the_input_are_refused(ptuning_run, tmp_path, capsys, monkeypatch):
    """PEFT's P_TUNING only prepends; a template that places prompts inside the input cannot go."""
    monkeypatch.setattr(E2E, "soft_positions", True, raising=False)
    assert "puts the prompts inside the input" in refused(capsys, tmp_path, ptuning_run)


def test_export_runs_without_peft_and_its_readme_loads_it(ptuning_run, tmp_path, monkeypatch):
    """Into an existing empty directory, from adapter_best, with `import peft` failing; then the
    README's own code (rebuilding the tiny backbone) loads the export."""
    out = tmp_path / "empty"
    out.mkdir()
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "peft", None)  # any `import peft` now raises ImportError
        importlib.reload(ptune.infer.export)  # a module-level `import peft` would fail here
        assert main(["export", f"run={ptuning_run}", f"out={out}", "adapter=adapter_best"]) == 0
    best = load_file(ptuning_run / "adapter_best/adapter_model.safetensors")["prompt"]
    assert torch.equal(load_file(out / "adapter_model.safetensors")["prompt_embeddings"], best)
    readme = (out / "README.md").read_text()
    code = readme.split("```python\n")[1].split("```")[0].replace("<this directory>", str(out))
    scope = {}
    exec(code, scope)
    assert isinstance(scope["model"], peft.PeftModel)
    assert torch.equal(scope["model"].prompt_encoder["default"].embedding.weight.detach(), best)


def tiny(name):
    cfg = compose([f"model={name}"]).model
    return models.load(cfg.name, cfg.kind, cfg.source, tiny=dict(cfg.tiny), tokenizer=cfg.tokenizer)


def test_a_trained_head_is_refused(monkeypatch):
    m = methods.build("prompt", tiny("tiny-gpt2"), num_virtual_tokens=P)
    monkeypatch.setattr(m, "adapter_tensors", lambda: {"prompt": m.prompt.detach(), "head.weight": torch.zeros(2, 64)})
    with pytest.raises(PtuneError, match="holds head.weight besides the prompt tensor"):
        to_peft(m, m.backbone)


def test_prefix_whose_layout_peft_derives_differently_is_refused():
    bb = tiny("tiny-llama")
    m = methods.build("prefix", bb, num_virtual_tokens=P, projection=False)
    to_peft(m, bb)  # the real layout maps
    # ptune reads the key/value heads one way, PEFT (from the config) another: 2 kv heads vs 4
    bb.dims = dataclasses.replace(bb.dims, n_kv_heads=4)
    with pytest.raises(PtuneError, match="layouts do not match"):
        to_peft(m, bb)
    # layers with different key/value shapes (Gemma 3/4 style): PEFT sizes for the largest
    bb.dims = dataclasses.replace(bb.dims, n_kv_heads=2)
    bb.model.config.global_head_dim = 32
    with pytest.raises(PtuneError, match="different key/value shapes"):
        to_peft(m, bb)


def test_help_lists_export(capsys):
    assert main(["--help"]) == 0
    assert "ptune export run=<run dir> out=<new dir>" in capsys.readouterr().out
