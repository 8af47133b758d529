"""`ptune plan` (ptune/train/memory_plan.py): exact parameter counts against real built models, the
activation model against what autograd really keeps, each key moving the plan the right way, and the
command end to end with its one-line refusals. No timings."""

import json

import pytest
import torch
from conftest import load
from omegaconf import OmegaConf

from ptune import build, heads, models, quantize
from ptune.cli import main
from ptune.config import compose
from ptune.train import memory_plan as mp
from ptune.train.job import frozen_dtype, total_params

CUDA = ["device=cuda", "device_memory=80GiB", "seq_len=64"]  # pure arithmetic: no data read


def plan(*keys):
    return mp.plan(["model=tiny-llama", "method=prompt", "task=e2e", *keys, *CUDA])


# -- parameter counts --------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("method", ["prompt", "prefix", "p-tuning", "p-tuning-v2"])
def test_counts_equal_a_real_built_model_and_method(model, method):
    cfg = compose([f"model={model}", f"method={method}", "task=e2e"])
    _, real, _ = build.build(cfg)
    config, tokenizer, _ = mp.model_config(cfg)
    m, _, notes = mp.build_model(cfg, config, tokenizer)
    trainable = sum(t.numel() for t in real.trainable_tensors().values())
    assert (m.params.total, m.params.trainable) == (total_params(real), trainable) and not notes
    assert m.params.backbone == sum(p.numel() for p in real.backbone.model.parameters())
    # the formula the plan falls back on when a method cannot be built on the meta device
    meta = mp.meta_backbone(cfg, config, tokenizer)
    assert mp.formula_trainable(cfg, meta) == trainable
    # every frozen matmul weight inside the layers, as quantization and sharding see them
    linear = sum(o * i for o, i in m.params.layer_linear)
    layers = [layer for stack in quantize.layer_lists(real.backbone.model) for layer in stack]
    assert linear == sum(mod.weight.numel() for layer in layers for mod in layer.modules() if mp.is_matmul(mod))


def test_counts_include_the_task_head():
    cfg = compose(["model=tiny-llama", "method=p-tuning-v2", "task=sst2"])
    _, real, _ = build.build(cfg)
    config, tokenizer, _ = mp.model_config(cfg)
    m, _, _ = mp.build_model(cfg, config, tokenizer)
    assert m.params.trainable == sum(t.numel() for t in real.trainable_tensors().values())
    assert m.params.trainable > mp.formula_trainable(cfg, mp.meta_backbone(cfg, config, tokenizer))  # + Linear(64, 2)


# -- the activation model against autograd's saved tensors ----------------------------------------------
def saved_bytes(cfg, batch: int, seq: int, n_labels: int) -> int:
    """Bytes of the distinct storages autograd keeps for one forward of heads.loss (parameters excluded)."""
    _, method, _ = build.build(cfg)
    model = method.backbone.model
    model.set_attn_implementation(build.attention(cfg))
    if frozen_dtype(cfg) is not None:
        models.store_frozen(model, frozen_dtype(cfg))
    model.train()
    ids = torch.randint(300, 1000, (batch, seq))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # a padded row, as real batches have
    labels = ids.clone()
    labels[:, : seq - n_labels] = -100
    def storage(t):  # (pointer, bytes); a quantized weight (a torchao tensor subclass) is a parameter: skipped
        try:
            return t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        except RuntimeError:
            return None, 0

    params = {storage(p)[0] for p in [*model.parameters(), *method.parameters()]}
    kept = {}

    def pack(t):
        ptr, size = storage(t)
        if ptr not in params:
            kept[ptr] = size
        return t

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.trainer.precision == "bf16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        heads.loss(method, {"input_ids": ids, "attention_mask": mask, "labels": labels, "layout": "causal"})
    return sum(kept.values())


@pytest.mark.parametrize("keys", [
    ["model=tiny-llama"],  # sdpa, a padding mask (k and v repeated to every head)
    ["model=tiny-llama", "trainer.precision=bf16"],  # eager under bf16 on CPU, stored bf16 weights, tied fp32 head
    ["model=tiny-llama", "trainer.precision=bf16", "trainer.frozen_dtype=fp32"],  # autocast's weight copies kept
    ["model=tiny-gpt2"],  # dropout everywhere (PyTorch's math attention), gelu_new
    ["model=tiny-gpt2", "method=prefix", "trainer.precision=bf16"],
    ["model=tiny-llama", "method=p-tuning-v2"],  # the prefix's dropout output and mask
    ["model=tiny-llama", "model.quantize=int8"],  # the int8 linear keeps its packed weight only (ptune.quantize)
    ["model=tiny-llama", "model.quantize=int8", "trainer.precision=bf16"],  # and returns fp32 under autocast
    ["model=tiny-llama", "model.quantize=nf4", "trainer.precision=bf16"],  # nf4 keeps the 4-bit weight only
])
def test_activations_match_what_autograd_keeps(keys):
    cfg = compose(["method=prompt", "task=e2e", *keys])
    batch, seq, n_labels = 4, 64, 2  # few label rows: the layers, not the logits, carry the total
    config, tokenizer, _ = mp.model_config(cfg)
    m, _, _ = mp.build_model(cfg, config, tokenizer)
    prepended, extra = m.method_info
    shape = mp.Shape(batch, seq + prepended, seq + prepended + extra, batch * n_labels)
    s = mp.settings_of(cfg, mp.options({"device": "cpu", "device_memory": "1GiB"}), "input")
    act = mp.activations(m.arch, m.params, shape, s, False, m.prefix_dropout)
    copy = m.arch.vocab * m.arch.hidden * 2 if s.precision == "bf16" else 0  # autocast's copy of the tied fp32 head
    planned = act["kept"] + 4 * shape.logit_rows * m.arch.vocab + copy
    measured = saved_bytes(cfg, batch, seq, n_labels)
    assert abs(planned - measured) / measured < 0.05, (planned, measured)


# -- each key moves the plan the right way --------------------------------------------------------------
def test_a_larger_batch_keeps_more_activations():
    small, large = plan("trainer.batch_size=4"), plan("trainer.batch_size=8")
    assert large["memory"]["activations"]["total"] > 1.9 * small["memory"]["activations"]["kept"]
    assert large["memory"]["activations"]["kept"] == pytest.approx(2 * small["memory"]["activations"]["kept"])
    assert large["time"]["flops"]["total"] > small["time"]["flops"]["total"]


def test_gradient_checkpointing_keeps_less_and_recomputes():
    plain, ckpt = plan("trainer.batch_size=8"), plan("trainer.batch_size=8", "trainer.gradient_checkpointing=true")
    assert ckpt["memory"]["activations"]["kept"] < plain["memory"]["activations"]["kept"] / 2
    assert ckpt["time"]["flops"]["recompute"] > 0 == plain["time"]["flops"]["recompute"]


def test_int8_stores_the_layer_linears_in_about_a_quarter():
    fp32, int8 = plan(), plan("model.quantize=int8")
    norms = 4 * fp32["parameters"]["layer_other"]
    ratio = (int8["memory"]["frozen_weights"]["layers"] - norms) / (fp32["memory"]["frozen_weights"]["layers"] - norms)
    assert 0.25 < ratio < 0.27  # 1 byte + a 5-byte scale and zero per row of 64 inputs
    assert int8["memory"]["frozen_weights"]["outside"] == fp32["memory"]["frozen_weights"]["outside"]  # embeddings untouched
    nf4 = plan("model.quantize=nf4", "trainer.precision=bf16")
    assert nf4["memory"]["frozen_weights"]["layers"] < int8["memory"]["frozen_weights"]["layers"]


def test_fsdp_halves_the_layer_weights_over_two_processes():
    one, two = plan(), plan("trainer.shard=fsdp", "processes=2")
    w1, w2 = one["memory"]["frozen_weights"], two["memory"]["frozen_weights"]
    assert w2["layers"] == pytest.approx(w1["layers"] / 2) and w2["outside"] == w1["outside"]
    assert w2["gathered_layer"] == pytest.approx(w1["layers"] / one["parameters"]["layers"])
    assert two["memory"]["trainable_state"] == one["memory"]["trainable_state"]  # trained tensors replicated


def test_bf16_frozen_weights_halve_the_linears():
    fp32, bf16 = plan(), plan("trainer.precision=bf16")
    norms = 4 * fp32["parameters"]["layer_other"]
    assert bf16["memory"]["frozen_weights"]["layers"] - norms == pytest.approx(
        (fp32["memory"]["frozen_weights"]["layers"] - norms) / 2)
    kept = plan("trainer.precision=bf16", "trainer.frozen_dtype=fp32")
    assert kept["memory"]["frozen_weights"]["layers"] == fp32["memory"]["frozen_weights"]["layers"]


def test_a_small_device_gets_a_suggestion_that_fits():
    result = mp.plan(["model=tiny-llama", "method=prompt", "task=e2e", "trainer.batch_size=64", "device=cuda",
                      "seq_len=512", "device_memory=1.5GiB"])
    assert not result["fits"] and result["suggestion"].startswith("it fits with ")
    fix = result["suggestion"].removeprefix("it fits with ").removesuffix(" fits").split()
    fixed = mp.plan(["model=tiny-llama", "method=prompt", "task=e2e", "trainer.batch_size=64", "device=cuda",
                     "seq_len=512", "device_memory=1.5GiB", *fix])
    assert fixed["fits"]


def test_seq_len_data_sizes_the_micro_batches_the_loop_cuts(data_dir):
    result = mp.plan(["model=tiny-llama", "method=prompt", "task=e2e", "task.max_train_samples=40", "trainer.batch_size=8",
                      "trainer.max_steps=3", "seq_len=data", "device=cuda"])
    job = result["job"]
    assert job["lengths_from"] == "data" and job["training_rows"] == 40 and 1 <= job["micro_batch_shapes"] <= 3
    assert job["seq"] <= 193 + 20 and job["logit_rows"] <= 8 * 65


# -- the command --------------------------------------------------------------------------------------
def test_plan_prints_the_table(data_dir, capsys):
    assert main(["plan", "model=tiny-llama", "method=prefix", "task=sst2", "task.max_train_samples=32"]) == 0
    out = capsys.readouterr().out
    for line in ("memory per process (MB):", "frozen weights", "trainable + grads + AdamW", "activations",
                 "process baseline", "training step", "peak (peak_memory_mb)", "fits in", "time:"):
        assert line in out, line
    assert main(["plan", "model=tiny-gpt2", "method=prompt", "task=e2e", "format=json", *CUDA]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fits"] is True and result["memory"]["peak_memory"] > 0 and result["parameters"]["trainable"] > 0


@pytest.mark.parametrize("arg, words", [
    ("processes=0", "processes='0' is invalid"),
    ("device_memory=abc", "device_memory='abc' is invalid"),
    ("tflops=-1", "tflops='-1' is invalid"),
    ("seq_len=0", "seq_len='0' is invalid"),
    ("device=tpu", "device='tpu' is invalid"),
    ("foo=1", "unknown key 'foo'"),
    ("trainer.nope=1", "unknown key"),
    ("model.quantize=int4", "model.quantize=int4 runs on a CUDA GPU only"),
    ("trainer.shard=fsdp", "trainer.shard=fsdp splits the backbone across processes"),
])
def test_a_bad_value_is_one_line_and_exit_2(arg, words, capsys):
    assert main(["plan", "model=tiny-llama", "device=cpu", arg]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and "\n" not in err


def test_a_hub_model_offline_is_one_line(capsys):
    assert main(["plan", "model=gpt2", "task=e2e", "device=cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model gpt2: no config.json for 'openai-community/gpt2'" in err and "\n" not in err


def test_a_local_config_dir_plans_without_weights_or_tokenizer(tmp_path):
    """model=llama model.name_or_path=<a dir with config.json only>: the published Llama numbers."""
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048,
              "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 8192,
              "vocab_size": 128256, "tie_word_embeddings": True, "head_dim": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = mp.plan(["model=llama", f"model.name_or_path={tmp_path}", "method=prompt", "task=e2e",
                      "trainer.precision=bf16", "device=cuda", "seq_len=512"])
    assert result["parameters"]["backbone"] == 1_235_814_400  # Llama-3.2-1B's published count
    assert any("no tokenizer" in n for n in result["notes"])


def test_plan_is_listed_in_the_usage(capsys):
    assert main(["--help"]) == 0
    assert "plan      peak memory per process" in capsys.readouterr().out


def test_tiny_config_is_the_one_models_load_builds():
    cfg = compose(["model=tiny-t5"])
    real = load("tiny-t5").model.config
    config, _, _ = mp.model_config(cfg)
    assert OmegaConf.create(config.to_dict()) == OmegaConf.create(real.to_dict())


def test_tflops_sets_the_time_and_device_the_baseline():
    """Every plan key acts: tflops= is the rate the time divides by; device=cpu adds this process's baseline."""
    keys = ["model=tiny-llama", "method=prompt", "task=e2e", "seq_len=64"]
    slow, fast = (mp.plan([*keys, "device=cuda", f"tflops={t}"])["time"] for t in (100, 200))
    assert slow["tflops"] == 100 and fast["tflops"] == 200 and slow["flops"] == fast["flops"] and slow["flops"]["total"] > 0
    assert slow["seconds_per_step"] == pytest.approx(2 * fast["seconds_per_step"])
    cpu, cuda = (mp.plan([*keys, f"device={d}"])["memory"]["peak_memory"] for d in ("cpu", "cuda"))
    assert cpu > cuda


def test_seq_len_and_device_memory_act():
    """seq_len= sets the rows' length (longer rows keep more activations); device_memory= decides the fit."""
    keys = ["model=tiny-llama", "method=prompt", "task=e2e", "device=cuda"]
    short, long = (mp.plan([*keys, f"seq_len={n}", "device_memory=80GiB"]) for n in (64, 256))
    assert long["memory"]["activations"]["kept"] > 3 * short["memory"]["activations"]["kept"]
    assert short["fits"] and not mp.plan([*keys, "seq_len=64", "device_memory=1MiB"])["fits"]
