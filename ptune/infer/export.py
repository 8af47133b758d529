"""`ptune export run=<run dir> format=peft out=<dir>`: a finished run's adapter in PEFT's format.

Writes what `peft.PeftModel.from_pretrained(base_model, out)` (peft 0.21.2) loads:
`adapter_config.json` with the keys PEFT's own `save_pretrained` writes for that config class
(sorted, inference_mode true), `adapter_model.safetensors` holding the one tensor PEFT saves for
prompt learning, `prompt_embeddings` (metadata {"format": "pt"}, as PEFT writes it), and a
README.md saying how the base model is rebuilt. PEFT is never imported: the key names and the
config arithmetic below mirror peft's `PromptLearningConfig` subclasses and
`peft.utils.other._prepare_prompt_learning_config`; tests/test_export.py loads every export with
PEFT and compares logits with ptune's (<= 1e-5, fp32).

What maps, and why it loads (PeftModel.from_pretrained forces inference_mode=True for prompt
learning, and in inference mode `PeftModel.get_prompt` returns `prompt_encoder.embedding.weight`
as it is, whatever the method):
- prompt  -> PROMPT_TUNING: ptune's `prompt` (p, hidden) is PEFT's `prompt_embeddings`.
  Encoder-decoders (T5, BART), for prompt and p-tuning alike: SEQ_2_SEQ_LM with
  num_transformer_submodules=1, a prompt in front of the encoder input only, which is all PEFT's
  seq2seq forward and generate() use (its default, 2, allocates unused decoder rows).
- prefix  -> PREFIX_TUNING, prefix_projection=false: ptune's adapter holds the collapsed prefix
  (p, L * 2 * kv_heads * head_dim) in PEFT's order (layer 0 K, layer 0 V, layer 1 K, ...). When
  ptune trained through the MLP (method.projection=true) the export is still the MLP's output,
  because that is all inference needs (PEFT too keeps only `embedding` in inference mode). For
  grouped-query attention PEFT sizes the prefix by the key/value heads (token_dim = kv_heads *
  head_dim, num_attention_heads = kv_heads, recomputed from the model config on load), which is
  ptune's layout; the export checks that PEFT's recomputation gives ptune's shapes and refuses
  otherwise.
- p-tuning-v2 -> PREFIX_TUNING, prefix_projection=false, on decoder-only models with the LM head:
  P-tuning v2 is ptune's prefix computation with the paper's defaults (no MLP, prefix dropout in
  training only), and its adapter holds the same collapsed prefix, so it maps as prefix does.
  With task.head=linear (the paper's setting) the head has no place in PEFT's adapter; on
  encoder-decoders the encoder and cross-attention prefixes have none either: both refused.
- p-tuning -> P_TUNING: ptune's adapter holds the prompt encoder's output (p, hidden); PEFT
  saves the same thing (`get_prompt_embedding_to_save` runs the encoder) and, in inference mode,
  builds no LSTM/MLP and uses the saved rows directly. So the adapter suffices and the encoder
  weights in checkpoints/ are not needed. encoder_hidden_size follows PEFT's convention (LSTM:
  units per direction = ptune's E / 2; MLP: E); it only describes the training.

Refused (one line, exit 2, nothing written): fine-tune and hard-prompt (no PEFT prompt-learning
counterpart); prefixes (prefix, p-tuning-v2) on encoder-decoders (ptune's paper-faithful encoder
and cross-attention prefixes have no place in PEFT, whose seq2seq prefix reaches only the
decoder's self-attention);
p-tuning prompts placed inside the input by a template (PEFT only prepends; a task says so with
`soft_positions = True`); classification heads (linear, verbalizer) and masked/encoder backbones,
which ptune only runs with them (PEFT would not reproduce the head); a prefix whose shapes PEFT
would derive differently from the model config.

Logits and greedy decoding agree for unpadded and right-padded input. Under left padding they
differ by design: PEFT puts the virtual tokens in front of the pads and lets the model count the
pads in positions; ptune numbers real tokens from the attention mask (encoder-decoders: real
tokens first). For a decoder-only prefix, PEFT shifts the position_ids it is given by p, so
passing (mask.cumsum(-1) - 1).clamp(min=0) restores ptune's numbering; for prompts PEFT drops
position_ids (tested).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ptune import heads, methods
from ptune.build import load_run, load_trained, setup_logging
from ptune.errors import PtuneError
from ptune.rundir import refuse_inside_run, write_atomic, write_json

FORMATS = ("peft",)
PEFT_VERSION = "0.21.2"  # the file format written: PEFT's config keys as of this release
TASK_TYPES = {"causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}
# ptune's prompt init -> PEFT's nearest name. PEFT skips initialisation when it loads (inference
# mode), so this only records how training began; `labels` (class-label embeddings, the rest
# sampled from the vocabulary) has no PEFT name and is recorded as SAMPLE_VOCAB.
PROMPT_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT", "labels": "SAMPLE_VOCAB"}
# Why a method without a PEFT type (Method.peft_type None) has no export, by where it acts.
NO_EQUIVALENT = {
    "weights": "it trains the backbone's own weights, and PEFT's prompt-learning adapters add tensors instead; "
               "load the run's adapter into the backbone with transformers",
    "none": "nothing was trained: the task's template is the whole method",
}


def export_run(run: str, fmt: str = "peft", out: str | None = None, which: str = "adapter",
               trust_remote_code: bool = False) -> Path:
    """Write run's adapter `which` as a PEFT adapter directory `out`. Returns out.

    Every check comes before the first write; the files go into a hidden sibling directory that
    is renamed to `out` at the end, so a refusal or a crash leaves no `out` behind.
    """
    run_dir, cfg = load_run(run, trust_remote_code)
    if fmt not in FORMATS:
        raise PtuneError(f"ptune export: format={fmt!r} is not one of {', '.join(FORMATS)}; use format=peft")
    if not out:
        raise PtuneError("ptune export needs out=<new directory>")
    out_dir = Path(out)
    refuse_inside_run(out_dir, "out")
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise PtuneError(f"ptune export: out={out_dir} exists and is not an empty directory; choose a new out=")
    refuse_config(cfg.method.name, cfg.model.name, cfg.model.kind, cfg.task.get("head", "lm"))
    setup_logging(None)
    backbone, method, task = load_trained(run_dir, cfg, which)
    if method.acts_on == "input" and task.soft_positions:
        raise PtuneError(f"ptune export: method=p-tuning with task {cfg.task.name}'s template puts the prompts inside "
                         f"the input, and PEFT's P_TUNING only prepends them; no PEFT export")
    config, tensors = to_peft(method, backbone, init_text=cfg.method.get("init_text"))
    _write(out_dir, config, tensors, _readme(run_dir.adapter(which).absolute(), cfg, config))
    return out_dir


def refuse_config(method: str, model: str, kind: str, head: str | None) -> None:
    """Raise the one-line refusal for combinations PEFT has no equivalent of (no model needed):
    what the method class declares (peft_type, acts_on) decides, never its name."""
    cls = methods.METHODS[method]
    if cls.peft_type is None and cls.acts_on in NO_EQUIVALENT:
        raise PtuneError(f"ptune export: method={method} has no PEFT equivalent: {NO_EQUIVALENT[cls.acts_on]}")
    if cls.peft_type is None:
        exportable = ", ".join(n for n, c in methods.METHODS.items() if c.peft_type)
        raise PtuneError(f"ptune export: method={method} has no PEFT export; exportable: {exportable}")
    if cls.acts_on == "kv" and kind == "seq2seq":
        raise PtuneError(f"ptune export: method={method} on model={model} has encoder, decoder and cross-attention "
                         f"prefixes, and PEFT's seq2seq prefix tuning holds only the decoder self-attention one; "
                         f"no PEFT export")
    if head is not None and not heads.get(head).generates:
        raise PtuneError(f"ptune export: task.head={head} is a classification head PEFT does not reproduce; "
                         f"PEFT export is for runs with the LM head")
    if kind not in TASK_TYPES:
        raise PtuneError(f"ptune export: model={model} is a {kind} model, which PEFT's prompt learning runs only "
                         f"inside its classification wrappers (SEQ_CLS, TOKEN_CLS) with their own heads; PEFT export "
                         f"is for causal and seq2seq LMs")


def to_peft(method, backbone, init_text: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json dict, {"prompt_embeddings": tensor}) for a loaded method on its backbone."""
    d, name = backbone.dims, method.name
    tensors = method.adapter_tensors()
    own = "prefix" if method.acts_on == "kv" else "prompt"
    extra = sorted(set(tensors) - {own})
    if extra:
        raise PtuneError(f"ptune export: the adapter holds {', '.join(extra)} besides the {name} tensor (a trained "
                         f"head), which PEFT's {name} adapter cannot hold; no PEFT export")
    refuse_config(name, backbone.name, backbone.kind, None)
    layers, token_dim, heads = peft_dims(backbone.model.config)
    config = dict(
        auto_mapping=None, base_model_name_or_path=getattr(backbone.model, "name_or_path", None) or None,
        inference_mode=True, modules_to_save=None, num_attention_heads=heads, num_layers=layers,
        num_transformer_submodules=1, num_virtual_tokens=method.num_virtual_tokens, peft_type=None,
        peft_version=PEFT_VERSION,
        revision=None, task_type=TASK_TYPES[backbone.kind], token_dim=token_dim,
    )
    if method.peft_type == "PROMPT_TUNING":
        text = method.init == "text"
        config.update(peft_type="PROMPT_TUNING", prompt_tuning_init=PROMPT_INITS[method.init],
                      prompt_tuning_init_text=init_text if text else None, tokenizer_kwargs=None,
                      tokenizer_name_or_path=getattr(backbone.tokenizer, "name_or_path", None) if text else None)
    elif method.peft_type == "P_TUNING":
        lstm = method.encoder == "lstm"
        config.update(peft_type="P_TUNING", encoder_reparameterization_type="LSTM" if lstm else "MLP",
                      encoder_hidden_size=method.encoder_hidden_size // 2 if lstm else method.encoder_hidden_size,
                      encoder_num_layers=2, encoder_dropout=0.0)
    else:
        kv_dim, kv_heads = _peft_prefix_kv(backbone.model.config, token_dim, heads)
        if (layers, kv_heads, kv_dim // kv_heads) != (d.n_layers, d.n_kv_heads, d.head_dim):
            raise PtuneError(
                f"ptune export: PEFT would read model={backbone.name}'s prefix as {layers} layers x {kv_heads} heads x "
                f"{kv_dim // kv_heads} dims (from the model config), ptune's prefix is {d.n_layers} x {d.n_kv_heads} x "
                f"{d.head_dim}; the layouts do not match, no PEFT export")
        config.update(peft_type="PREFIX_TUNING", token_dim=kv_dim, num_attention_heads=kv_heads,
                      encoder_hidden_size=kv_dim, init_weights=None, prefix_projection=False)
    rows = tensors[own].detach().float().cpu().contiguous()  # prompt: (p, hidden); prefix: (p, L*2*kv*hd)
    width = 2 * d.n_layers * config["token_dim"] if method.acts_on == "kv" else config["token_dim"]
    want = (method.num_virtual_tokens, width)
    if tuple(rows.shape) != want:  # PEFT's nn.Embedding is built from the config; the tensor must fill it
        raise PtuneError(f"ptune export: the adapter's {own} has shape {tuple(rows.shape)}, PEFT's config for "
                         f"model={backbone.name} needs {want}; no PEFT export")
    return dict(sorted(config.items())), {"prompt_embeddings": rows}


def _text_config(config) -> dict:
    out = config.to_dict()
    return out.get("text_config") or out  # PEFT reads a VLM's language model config


def peft_dims(config) -> tuple[int, int, int]:
    """(num_layers, token_dim, num_attention_heads) as PEFT derives them from a transformers config."""
    c = _text_config(config)
    layers = (getattr(config, "num_hidden_layers", None) or c.get("num_hidden_layers") or c.get("num_layers")
              or c.get("n_layer"))
    token_dim = c.get("hidden_size") or c.get("n_embd") or c.get("d_model")
    heads = (c.get("num_attention_heads") or c.get("n_head") or c.get("num_heads")
             or c.get("encoder_attention_heads"))
    if not (layers and token_dim and heads):
        raise PtuneError(f"ptune export: cannot read layers/hidden size/heads from the {c.get('model_type')} config "
                         f"the way PEFT does; no PEFT export")
    return int(layers), int(token_dim), int(heads)


def _peft_prefix_kv(config, token_dim: int, heads: int) -> tuple[int, int]:
    """(token_dim, num_attention_heads) PEFT uses for a prefix: key/value width and heads under GQA."""
    c = _text_config(config)
    if "num_key_value_heads" not in c:
        return token_dim, heads
    if c.get("global_head_dim") is not None or c.get("per_layer_config") is not None:
        raise PtuneError(f"ptune export: model type {c.get('model_type')} has layers of different key/value shapes; "
                         f"PEFT sizes its prefix for the largest and skips the rest, ptune's prefix is uniform; "
                         f"no PEFT export")
    head_dim = c["head_dim"] if c.get("head_dim") is not None else token_dim // heads
    return head_dim * c["num_key_value_heads"], c["num_key_value_heads"]


def _readme(adapter: Path, cfg, config: dict) -> str:
    """How to load the export; for tiny random backbones, the call that rebuilds the same weights."""
    m, base = cfg.model, config["base_model_name_or_path"]
    auto = "AutoModelForCausalLM" if config["task_type"] == "CAUSAL_LM" else "AutoModelForSeq2SeqLM"
    if base:
        load = f"from transformers import {auto}\nbase = {auto}.from_pretrained({base!r})"
    else:  # a tiny random model: the same seed rebuilds the same weights
        tiny = OmegaConf.to_container(m.tiny) if m.get("tiny") else None
        load = (f"from ptune import models  # random weights, rebuilt from the run's model config and seed\n"
                f"base = models.load({m.name!r}, {m.kind!r}, {m.source!r}, tiny={tiny!r}, "
                f"tokenizer={m.get('tokenizer')!r}, seed={m.get('init_seed', 0)}).model")
    tip = ("To number them as ptune does, pass PEFT's forward\n"
           "position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0)." if config["peft_type"] == "PREFIX_TUNING"
           else "Pad on the right for PEFT.")
    return (f"# {config['peft_type']} adapter exported by ptune\n\n"
            f"From `{adapter}` (method={cfg.method.name}, model={m.name}, task={cfg.task.name}), in the\n"
            f"format of peft {PEFT_VERSION}, task_type {config['task_type']}.\n\n"
            f"```python\nimport peft\n{load}\n"
            f"model = peft.PeftModel.from_pretrained(base, \"<this directory>\")\n```\n\n"
            f"Logits equal ptune's for unpadded and right-padded input. Under left padding they differ:\n"
            f"PEFT puts the virtual tokens before the pads and counts pads in positions, ptune does not.\n{tip}\n")


def _write(out: Path, config: dict, tensors: dict[str, torch.Tensor], readme: str) -> None:
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the export private; mkdir's permissions instead
    try:
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        write_json(config, tmp / "adapter_config.json")
        write_atomic(tmp / "README.md", readme)
        os.replace(tmp, out)  # out is absent or an empty directory: rename replaces it in one step
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
