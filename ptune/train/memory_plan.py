"""`ptune plan`: the peak memory per process and the time per optimizer step of a training job, before
it runs, from the model's config alone (no weights are read).

The config is composed as `ptune train` composes it; the backbone is built on PyTorch's `meta` device
(shapes, no storage) and the method and its head are built on it, so the parameter counts are the ones
the run will have, per module. Memory per process, in the order the run allocates it:

- frozen weights: layer matmul weights in the stored dtype (fp32; bf16/fp16 under trainer.frozen_dtype=auto
  with that precision, models.store_frozen), or quantized (model.quantize: int8 1 byte + a scale and a zero
  per row, nf4 0.5 byte + QLoRA's double-quantized block scales, int4 0.5 byte + a bf16 scale and zero per
  group of 128), or split across processes (trainer.shard=fsdp, plus one gathered layer); embeddings,
  norms, a tied LM head fp32 as the run keeps them;
- trainable tensors, their gradients and AdamW's two moments: 4 + 4 + 8 bytes per trained number;
- activations autograd keeps for the backward pass of one micro-batch (trainer.batch_size rows of the
  task's longest input plus the virtual tokens), per layer as the family's code saves them (counted
  tensor by tensor on tiny models: tests/test_plan.py), the LM head's fp32 logits of the label
  positions with their log-softmax and gradients, and the largest transient of the backward pass;
  with gradient checkpointing only each layer's input is kept and one layer is recomputed at a time;
- a process baseline: on CPU the resident memory of this very process (python, torch, transformers, the
  tokenizer) and the RSS that encoding the task's training rows adds, both measured when the plan runs;
  on a GPU nothing (peak_memory_mb there is torch.cuda.max_memory_allocated), plus a reserve for the
  CUDA context when deciding whether it fits;
- loading: the run reads the weights in fp32 and converts them after (on a GPU the whole fp32 model
  reaches the device before store_frozen; quantization converts layer by layer; a sharded run converts on
  the host, one process after another, and sends each layer's share only to its device).

Time: matmul FLOPs of the frozen backbone (forward 2·N per token, backward input gradients only
another 2·N, attention scores both ways, the LM head at the label positions, one more forward of the
layers with checkpointing) over a sustained rate: `tflops=`, or on CPU the rate measured on this
machine from SmolLM2-135M training steps (MEASURED_TFLOPS).

Left out: allocator fragmentation and caching (the CUDA caching allocator reserves more than it
allocates), evaluation and generation (smaller than a training step for these tasks), fine-tune's
weight gradients' activations (approximated), T5/BART's per-layer detail (a generic layer: marked
approximate), buffers (rotary tables, position ids), the optimizer's foreach temporaries, host RAM
of a GPU run, and communication time. docs/performance.md ("Memory plan") gives the measured errors.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, replace

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ptune import build, heads, methods, metrics, models, quantize, tasks
from ptune.config import GROUPS, TOP_LEVEL, check, compose, task_kwargs
from ptune.errors import PtuneError
from ptune.methods import kv
from ptune.train import shard
from ptune.train.job import frozen_dtype
from ptune.train.plan import epoch_plan, micro_batches

MB = 2**20
GiB = 2**30
PLAN_KEYS = {"device_memory": "this machine's RAM (cpu) or the GPU's memory (cuda)", "processes": "1 (or $WORLD_SIZE)",
             "device": "cuda if one is available, else cpu", "seq_len": "max (the task's limits) | data | <tokens>",
             "tflops": "measured on this CPU / none on a GPU", "format": "text | json"}
# Sustained training rate of this image's 2-core CPU (AMD EPYC, AVX-512 BF16), measured by
# scripts/bench_plan.py on 2026-12-06: SmolLM2-135M, E2E, batch 8, prefix, the plan's FLOPs of one
# optimizer step over the median measured step time (bench/plan-2026-12-06.json, "tflops").
MEASURED_TFLOPS = {"fp32": 0.080, "bf16": 0.125}
CUDA_RESERVE = 1 * GiB  # CUDA context + caching-allocator slack kept free when deciding whether it fits (assumed)
QUANT_BITS = {"int8": 8, "int4": 4, "nf4": 4}
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "granite", "smollm3"}
GPT2_LIKE = {"gpt2"}
BERT_LIKE = {"bert", "roberta", "xlm-roberta", "electra"}


# -- the command's own keys ----------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    device: str
    device_memory: int  # bytes
    processes: int
    seq_len: str | int  # "max" | "data" | tokens
    tflops: float | None
    format: str


def split_args(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """(ptune train overrides, {plan key: text}); one PtuneError line for anything else."""
    overrides, own = [], {}
    for a in argv:
        key, eq, value = a.partition("=")
        if a.startswith("-") or not eq:
            raise PtuneError(f"ptune plan: unexpected argument {a!r}; arguments are ptune train's key=value overrides "
                             f"and {', '.join(k + '=' for k in PLAN_KEYS)}")
        bare = key.lstrip("+~")
        if key in PLAN_KEYS:
            own[key] = value
        elif "." not in bare and bare not in GROUPS and bare not in TOP_LEVEL:
            raise PtuneError(f"ptune plan: unknown key {key!r}; it takes ptune train's overrides and "
                             f"{', '.join(k + '=' for k in PLAN_KEYS)}")
        else:
            overrides.append(a)
    return overrides, own


def parse_size(key: str, text: str) -> int:
    """'80GiB', '24GB', '512MiB', '1.5TiB' or a number of bytes -> bytes (GB = 10^9, GiB = 2^30)."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in units or float(m.group(1)) <= 0:
        raise PtuneError(f"{key}={text!r} is invalid: write a size such as 80GiB, 24GB or 512MiB")
    return int(float(m.group(1)) * units[m.group(2).lower()])


def _whole(key: str, text: str, low: int) -> int:
    if not text.isdigit() or int(text) < low:
        raise PtuneError(f"{key}={text!r} is invalid: must be a whole number >= {low}")
    return int(text)


def options(own: dict[str, str]) -> Options:
    device = own.get("device", "cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise PtuneError(f"device={device!r} is invalid: choose cpu or cuda")
    processes = _whole("processes", own.get("processes", os.environ.get("WORLD_SIZE", "1")), 1)
    seq = own.get("seq_len", "max")
    seq = seq if seq in ("max", "data") else _whole("seq_len", seq, 1)
    tflops = own.get("tflops")
    if tflops is not None:
        try:
            tflops = float(tflops)
        except ValueError:
            tflops = -1.0
        if not (math.isfinite(tflops) and tflops > 0):
            raise PtuneError(f"tflops={own['tflops']!r} is invalid: must be a number > 0 (sustained TFLOPS per process)")
    fmt = own.get("format", "text")
    if fmt not in ("text", "json"):
        raise PtuneError(f"format={fmt!r} is invalid: choose text or json")
    memory = parse_size("device_memory", own["device_memory"]) if "device_memory" in own else device_total(device)
    return Options(device, memory, processes, seq, tflops, fmt)


def device_total(device: str) -> int:
    """This machine's RAM (cpu) or the first GPU's memory (cuda; 80 GiB when none is here to ask)."""
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 80 * GiB
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# -- the model's config, its tokenizer, and the backbone on the meta device -----------------------
def _hub_config(path: str, name: str, trust: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust)
    except OSError:
        raise PtuneError(f"model {name}: no config.json for {path!r} here (not a local directory, not in the cache, and "
                         f"the hub cannot be reached); set model.name_or_path=/path/to/a/dir/with/config.json") from None
    except ValueError as e:
        raise PtuneError(f"model {name}: {str(e).splitlines()[0]}") from None


def _tokenizer_or_borrowed(path: str, trust: bool) -> tuple[object, str | None]:
    try:
        return models.load_tokenizer("hub", path, trust), None
    except (OSError, ValueError, TypeError):
        note = f"no tokenizer at {path}: SmolLM2's is used for the data (the vocabulary size is the config's)"
        return models.load_tokenizer("smollm2", ""), note


def model_config(cfg: DictConfig) -> tuple[object, object, str | None]:
    """(transformers config, tokenizer, note) of cfg.model without reading any weights."""
    m = cfg.model
    trust = m.get("trust_remote_code") is True
    if m.source == "tiny":
        tok = models.load_tokenizer(m.get("tokenizer") or "smollm2", m.get("name_or_path") or "")
        return models.tiny_config(OmegaConf.to_container(m.tiny), tok), tok, None
    if m.source in ("gguf", "package"):
        path = str(models.smollm2_dir() if m.source == "gguf" else models.minilm_dir())
        return _hub_config(path, m.name, trust), models.load_tokenizer("hub", path, trust), None
    if m.source == "hub":
        if not m.get("name_or_path"):
            raise PtuneError(f"model {m.name}: model.name_or_path is empty; set it to a hub id or a local directory")
        config = _hub_config(str(m.name_or_path), m.name, trust)
        return (config, *_tokenizer_or_borrowed(str(m.name_or_path), trust))
    raise PtuneError(f"model.source={m.source!r} is not one of hub, gguf, package, tiny")


def meta_backbone(cfg: DictConfig, config, tokenizer) -> models.Backbone:
    """The frozen backbone with every tensor on the meta device: its modules and shapes, no storage."""
    with torch.device("meta"):
        model = models.auto_class(cfg.model.kind).from_config(config, trust_remote_code=cfg.model.get("trust_remote_code") is True)
    model.requires_grad_(False)
    return models.Backbone(model, tokenizer, models.dims_of(model.config, cfg.model.kind), cfg.model.kind, cfg.model.name)


def meta_method(cfg: DictConfig, backbone: models.Backbone):
    """(method with its head, task) built on the meta backbone; (None, task) when that cannot run on meta.
    method.init is set to random: initial values are never read, and only random draws nothing."""
    counting = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if "init" in counting.method:
        counting.method.init = "random"
    try:
        with torch.device("meta"):
            _, method, task = build.build(counting, backbone=backbone)
        return method, task
    except (NotImplementedError, RuntimeError, TypeError, ValueError):
        return None, tasks.build(cfg.task.name, **task_kwargs(cfg))


def formula_trainable(cfg: DictConfig, backbone: models.Backbone) -> int:
    """The method's trainable numbers from its declared kind and config (the head not included): what
    the plan counts when the method cannot be built on the meta device."""
    acts_on = methods.METHODS[cfg.method.name].acts_on
    m, hidden = cfg.method, backbone.dims.hidden
    p = m.get("num_virtual_tokens") or 0
    if acts_on == "input":
        return p * hidden + (_encoder_params(m.encoder, m.get("encoder_hidden_size") or hidden, hidden)
                             if "encoder" in m else 0)
    if acts_on == "kv":
        return sum(_prefix_params(p, s.width, m.projection, m.get("embed_dim") or hidden, m.mid_dim)
                   for s in kv.stacks_of(backbone))
    if acts_on == "weights":
        return sum(t.numel() for t in backbone.model.parameters())
    return 0


def _encoder_params(encoder: str, width: int, hidden: int) -> int:
    """P-tuning's prompt encoder (ptune/methods/p_tuning.py): LSTM or MLP, without its (p, hidden) input."""
    if encoder == "lstm":
        h = width // 2  # units per direction, 2 layers, both directions; PyTorch's LSTM has two bias vectors
        lstm = 2 * (4 * h * (hidden + h) + 8 * h) + 2 * (4 * h * (width + h) + 8 * h)
        return lstm + width * width + width + width * hidden + hidden
    return hidden * width + width + width * width + width + width * hidden + hidden


def _prefix_params(p: int, width: int, projection: bool, embed: int, mid: int) -> int:
    """kv.PrefixParams: P' (p, E) and Linear(E, M) - Tanh - Linear(M, W), or P (p, W) itself."""
    return p * embed + embed * mid + mid + mid * width + width if projection else p * width


# -- parameters, by where they sit and how the run stores them -------------------------------------
@dataclass(frozen=True)
class Params:
    total: int
    trainable: int
    layers: int  # repeated layers (FSDP units, quantized stacks)
    layer_linear: tuple[tuple[int, int], ...]  # (out, in) of every frozen matmul weight inside the layers
    layer_bias: int  # frozen matmul biases inside the layers
    layer_other: int  # frozen norms and anything else inside the layers (fp32)
    outer_linear: int  # frozen matmul weights outside the layers not shared with an embedding (an untied LM head)
    outer_other: int  # embeddings (a tied LM head), final norms (fp32)
    lm_head_fp32: bool  # the LM head's matrix stays fp32 (tied to the embeddings)
    trainable_in_backbone: int  # fine-tune: backbone tensors that train
    backbone: int  # every backbone parameter (a tied matrix once)


def is_matmul(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def _shape(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return tuple(w.shape) if isinstance(module, nn.Linear) else (w.shape[1], w.shape[0])  # Conv1D stores (in, out)


def _layer_params(stacks: list) -> tuple[set, list, int, int]:
    """(ids seen, (out, in) of each frozen matmul weight, frozen matmul biases, other frozen) inside the layers."""
    seen, linear, bias, other = set(), [], 0, 0
    for module in (m for stack in stacks for layer in stack for m in layer.modules()):
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or p.requires_grad:
                seen.add(id(p))
                continue
            seen.add(id(p))
            if is_matmul(module) and name == "weight":
                linear.append(_shape(module))
            elif is_matmul(module):
                bias += p.numel()
            else:
                other += p.numel()
    return seen, linear, bias, other


def _outer_params(model: nn.Module, seen: set) -> tuple[int, int]:
    """(frozen matmul weights not shared with an embedding, everything else frozen) outside the layers."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matmul = other = 0
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen or p.requires_grad:
                continue
            seen.add(id(p))
            if is_matmul(module) and id(p) not in embeddings:
                matmul += p.numel()
            else:
                other += p.numel()
    return matmul, other


def count_params(model: nn.Module, method) -> Params:
    """Every backbone parameter once (a tied matrix once), sorted by where it sits and how it is stored."""
    stacks = quantize.layer_lists(model)
    seen, linear, bias, other = _layer_params(stacks)
    outer_linear, outer_other = _outer_params(model, seen)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = sum(p.numel() for p in model.parameters())
    own = sum(p.numel() for p in method.parameters()) if method is not None else 0
    trainable = sum(t.numel() for t in method.trainable_tensors().values()) if method is not None else 0
    return Params(backbone + own, trainable, sum(len(st) for st in stacks), tuple(linear), bias, other, outer_linear,
                  outer_other, head is not None and id(head.weight) in embeddings,
                  sum(p.numel() for p in model.parameters() if p.requires_grad), backbone)


# -- the architecture numbers the activations depend on -------------------------------------------
@dataclass(frozen=True)
class Arch:
    family: str  # llama | gpt2 | bert | other (approximate)
    layers: int
    encoder_layers: int  # encoder-decoders: the encoder's (the decoder's are `layers`)
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    act_saved: int  # (batch, seq, intermediate) tensors the MLP's activation keeps
    attn_dropout: float
    hidden_dropout: float
    embed_dropout: float
    lm_head: bool  # the model has an LM head (logits over the vocabulary)


def _first(config, *names, default=None):
    return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), default)


def arch_of(config, dims: models.Dims, kind: str) -> Arch:
    mt = getattr(config, "model_type", "")
    family = "llama" if mt in LLAMA_LIKE else "gpt2" if mt in GPT2_LIKE else "bert" if mt in BERT_LIKE else "other"
    hidden = dims.hidden
    inter = _first(config, "intermediate_size", "n_inner", "d_ff", "decoder_ffn_dim", "ffn_dim") or 4 * hidden
    act = str(_first(config, "hidden_act", "activation_function", "dense_act_fn", "feed_forward_proj", default="gelu"))
    act_saved = 3 if family == "llama" else 4 if act == "gelu_new" else 2 if "gated" in act else 1
    attn_drop = float(_first(config, "attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", "dropout_rate",
                             default=0.0))
    hid_drop = float(_first(config, "resid_pdrop", "hidden_dropout_prob", "dropout", "dropout_rate", default=0.0))
    emb_drop = float(_first(config, "embd_pdrop", "hidden_dropout_prob", "dropout", default=0.0))
    return Arch(family, dims.n_layers, dims.n_encoder_layers, hidden, dims.n_heads, dims.n_kv_heads, dims.head_dim,
                inter, config.vocab_size, act_saved, attn_drop, hid_drop, emb_drop, kind in ("causal", "masked", "seq2seq"))


# -- the shape of one micro-batch ------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    batch: int
    seq: int  # query positions per row (virtual tokens the method prepends included)
    keys: int  # key positions per row (+ prefix keys)
    logit_rows: int  # rows of vocabulary logits in the micro-batch (label positions, {mask}s)
    source: int = 0  # encoder-decoders: encoder positions (seq is then the decoder's)
    how: str = ""


def task_lengths(task_cfg: DictConfig, generates: bool) -> tuple[int, int]:
    """(longest input, label positions per row) the task's config allows."""
    source = _first(task_cfg, "max_source_len", "max_source_length", "max_len")
    if source is None:
        raise PtuneError("ptune plan cannot read this task's maximum input length; give seq_len=<tokens>")
    if generates:
        target = int(task_cfg.get("max_target_len") or 64) + 1  # + eos
        return int(source) + target, target
    return int(source), 1


def max_shape(cfg: DictConfig, kind: str, head, method_info: tuple[int, int], seq_len) -> Shape:
    """The worst micro-batch the config allows: every row as long as the task keeps it (or seq_len tokens,
    of which a generation task's target length carries labels)."""
    prepended, kv_extra = method_info
    batch = cfg.trainer.batch_size
    source, rows = task_lengths(cfg.task, head.generates)
    if isinstance(seq_len, int):
        source, rows = seq_len, min(rows, seq_len)
    how = f"seq_len={seq_len}" if isinstance(seq_len, int) else "the task's maximum lengths"
    if kind == "seq2seq" and head.generates:
        encoder = source if isinstance(seq_len, int) else source - rows
        return Shape(batch, rows, rows + kv_extra, batch * rows, encoder + prepended, how)
    logit_rows = batch * rows if (head.generates or head.at_mask) else 0
    return Shape(batch, source + prepended, source + prepended + kv_extra, logit_rows, 0, how)


def data_shapes(cfg: DictConfig, examples: list, method_info, processes: int) -> list[Shape]:
    """Every micro-batch of this process over the run's first epoch of steps (up to max_steps), from the
    task's real training rows as the loop cuts them (ptune.train.plan)."""
    prepended, kv_extra = method_info
    t = cfg.trainer
    step = t.batch_size * t.grad_accum * processes
    if len(examples) < step:
        raise PtuneError(f"{len(examples)} training examples are fewer than one step needs ({step} = batch_size x "
                         f"grad_accum x processes); lower trainer.batch_size or add data")
    lengths = [len(e.input_ids) for e in examples]
    shapes = set()
    for indices in epoch_plan(lengths, step, t.seed, 0, t.group_by_length)[: t.max_steps]:
        ordered = sorted(indices, key=lambda i: lengths[i])
        for mb in micro_batches(ordered, t.grad_accum, processes, 0):
            shapes.add(_batch_shape([examples[i] for i in mb], prepended, kv_extra))
    return sorted(shapes, key=lambda x: (x.seq, x.logit_rows))


def _batch_shape(rows: list, prepended: int, kv_extra: int) -> Shape:
    width = max(len(e.input_ids) for e in rows)
    layout = rows[0].layout
    if layout == "seq2seq":
        target = max(len(e.labels) for e in rows)
        labels = sum(e.n_loss_terms() for e in rows)
        return Shape(len(rows), target, target + kv_extra, labels, width + prepended, "data")
    labels = sum(e.n_loss_terms() for e in rows) if layout == "causal" else len(rows) if layout == "slot" else 0
    return Shape(len(rows), width + prepended, width + prepended + kv_extra, labels, 0, "data")


# -- what the run does with them ------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """The keys that change memory and time (read with .get: configs from before a key existed)."""

    device: str
    precision: str
    frozen: str  # the stored dtype of frozen matmul weights: fp32 | bf16 | fp16
    checkpointing: bool
    quantize: str
    shard: str
    processes: int
    batch: int
    grad_accum: int
    attention: str  # eager | sdpa
    fine_tune: bool
    mapped: bool  # CPU, weights read from safetensors: the fp32 file stays mapped and resident once read


def settings_of(cfg: DictConfig, opts: Options, acts_on: str) -> Settings:
    """The keys of a composed config (and the plan's device and processes) as Settings."""
    t = cfg.trainer
    frozen = frozen_dtype(cfg)
    attention = t.get("attention", "sdpa")
    if attention == "auto":  # as ptune.build.attention decides it, for the planned device
        attention = "eager" if t.precision == "bf16" and opts.device == "cpu" else "sdpa"
    return Settings(opts.device, t.precision, {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[frozen],
                    bool(t.get("gradient_checkpointing", False)), cfg.model.get("quantize", "none"),
                    t.get("shard", "none"), opts.processes, t.batch_size, t.grad_accum, attention, acts_on == "weights",
                    opts.device == "cpu" and cfg.model.source != "tiny")


def _compute_bytes(s: Settings) -> int:
    return 4 if s.precision == "fp32" else 2


def quantized_bytes(out: int, inp: int, how: str) -> float:
    """Bytes of one quantized (out, in) weight as torchao stores it (ptune/quantize.py)."""
    n = out * inp
    if how == "int8":  # int8 values + an fp32 scale and an int8 zero point per output row
        return n + 5 * out
    if how == "int4":  # two values per byte + a bf16 scale and zero per group of 128
        return n / 2 + 4 * n / quantize.INT4_GROUP
    blocks = n // quantize.NF4_BLOCK  # nf4: two values per byte + an int8 scale per block of 64, fp32 per 256 scales
    return n / 2 + blocks + 4 * math.ceil(blocks / 256) + 4 + 64


def weight_bytes(p: Params, s: Settings) -> dict:
    """Frozen weights held per process: inside the layers (quantized or sharded) and outside. On CPU, weights
    read from safetensors are pages of the file mapped into memory: once a step has read them they are resident,
    and a converted copy (store_frozen's bf16, a quantized weight) comes on top, since the file stays mapped
    while any of its tensors (the embeddings) lives. Those file pages are clean: the kernel may drop them under
    memory pressure, but peak RSS counts them."""
    frozen = 4 if s.frozen == "fp32" else 2
    linear = sum(quantized_bytes(o, i, s.quantize) if s.quantize != "none" else o * i * frozen for o, i in p.layer_linear)
    layers = linear + p.layer_bias * frozen + p.layer_other * 4
    share = s.processes if s.shard == "fsdp" else 1
    outer = p.outer_linear * frozen + p.outer_other * 4
    gathered = layers / max(p.layers, 1) if s.shard == "fsdp" else 0  # one layer whole during its forward/backward
    converted = s.quantize != "none" or s.frozen != "fp32"
    file_pages = 4 * sum(o * i for o, i in p.layer_linear) if s.mapped and converted else 0
    if file_pages and s.quantize == "none":  # store_frozen converts the outside matmuls (an untied head) too
        file_pages += 4 * p.outer_linear + 4 * p.layer_bias
    return {"layers": layers / share, "outside": outer, "gathered_layer": gathered, "file_pages": file_pages,
            "total": layers / share + outer + gathered + file_pages}


def layer_saved(a: Arch, s: Settings, batch: int, seq: int, keys: int) -> float:
    """Bytes one layer keeps for the backward pass (input gradients only; the weights are frozen)."""
    c = _compute_bytes(s)
    c_lin = 4 if s.quantize == "int8" else c  # torchao's int8 linear returns fp32 under autocast (measured)
    tokens = batch * seq
    norm_stats = 4 if a.family == "llama" else 8  # RMSNorm's rsqrt; LayerNorm's mean and rstd
    saved = 2 * tokens * (a.hidden * 4 + norm_stats)  # both norms' fp32 inputs (the residual stream)
    if a.family != "llama" and a.hidden_dropout > 0:
        saved += 2 * tokens * a.hidden * c_lin  # the two residual dropout masks
    saved += a.act_saved * tokens * a.intermediate * c_lin
    return saved + attention_saved(a, s, batch, seq, keys)


def attention_saved(a: Arch, s: Settings, batch: int, seq: int, keys: int) -> float:
    """eager (or PyTorch's math path, which CPU sdpa takes with dropout): q, k, v and the probabilities
    (fp32 softmax, its low-precision copy, dropout's mask and output); fused sdpa: q, k, v, the output,
    the log-sum-exp and the padding mask (k and v repeated to every head when a mask is given)."""
    c = _compute_bytes(s)
    width = a.heads * a.head_dim
    math_path = s.attention == "eager" or (a.attn_dropout > 0 and s.device == "cpu")
    if math_path:
        per_score = 4 + (2 * c if a.attn_dropout > 0 else (c if c < 4 else 0))
        return batch * (seq + 2 * keys) * width * c + batch * a.heads * seq * keys * per_score
    return batch * (2 * seq + 2 * keys) * width * c + batch * a.heads * seq * 4 + batch * seq * keys * 4


def once_saved(a: Arch, batch: int, seq: int) -> float:
    """Outside the layers: the final norm's input, the embeddings' norm and dropout."""
    tokens = batch * seq
    if a.family == "llama":
        return tokens * (a.hidden * 4 + 4)
    dropout = tokens * a.hidden * 4 if a.embed_dropout > 0 else 0
    return tokens * (a.hidden * 4 + 8) + dropout + (tokens * a.hidden * 4 if a.family == "other" else 0)


def logits_peak(a: Arch, p: Params, shape: Shape, s: Settings, seq2seq: bool) -> float:
    """The loss: fp32 log-softmax of the label rows, its gradient and the logits' gradient at once (12 bytes
    per logit), the model's full decoder logits for encoder-decoders, and autocast's low-precision copy of
    an fp32 LM head matrix, which the backward keeps."""
    if not a.lm_head or shape.logit_rows == 0:
        return 0
    c = _compute_bytes(s)
    peak = 12 * shape.logit_rows * a.vocab
    if seq2seq:
        peak += shape.batch * shape.seq * a.vocab * c
    if c < 4 and (p.lm_head_fp32 or s.frozen == "fp32"):
        peak += a.vocab * a.hidden * c
    return peak


def weight_copies(p: Params, s: Settings) -> float:
    """Per layer: low-precision copies of frozen layer weights the backward keeps: autocast's cast of fp32
    weights under bf16/fp16 (a quantized linear keeps its packed weight only: ptune.quantize)."""
    c = _compute_bytes(s)
    copies = s.quantize == "none" and c < 4 and s.frozen == "fp32"
    return sum(o * i for o, i in p.layer_linear) * c / max(p.layers, 1) if copies else 0


def activations(a: Arch, p: Params, shape: Shape, s: Settings, seq2seq: bool, prefix_dropout: int = 0) -> dict:
    """Saved activations of one micro-batch and the largest transient on top of them. prefix_dropout: the
    numbers per row of a prefix that dropout materializes (its output and its mask, fp32, outside the layers)."""
    decoder = layer_saved(a, s, shape.batch, shape.seq, shape.keys)
    if seq2seq:  # + cross-attention over the encoder's positions and its norm (approximate)
        decoder += attention_saved(a, s, shape.batch, shape.seq, shape.source) + shape.batch * shape.seq * a.hidden * 4
    encoder = layer_saved(a, s, shape.batch, shape.source, shape.source) if seq2seq else 0
    layer = max(decoder, encoder) + weight_copies(p, s)
    if s.fine_tune:  # weight gradients need every linear's input (approximate)
        layer += shape.batch * shape.seq * (4 * a.hidden + a.intermediate) * _compute_bytes(s)
    n_dec, n_enc = a.layers, a.encoder_layers if seq2seq else 0
    if s.checkpointing:  # each layer's input only; one layer recomputed, with its gradients
        kept = (n_dec * shape.batch * shape.seq + n_enc * shape.batch * shape.source) * a.hidden * 4
        transient = 2 * layer
    else:
        kept = n_dec * (decoder + weight_copies(p, s)) + n_enc * (encoder + weight_copies(p, s))
        transient = layer  # the gradients of one layer's activations while its backward runs
    kept += once_saved(a, shape.batch, shape.seq) + 2 * 4 * shape.batch * prefix_dropout
    loss = logits_peak(a, p, shape, s, seq2seq)
    # the backward dequantizes one weight at a time for the input gradient, in the compute dtype (ptune.quantize)
    dequantized = max((o * i for o, i in p.layer_linear), default=0) * _compute_bytes(s) if s.quantize in ("nf4", "int8") else 0
    return {"kept": kept, "layer": layer, "logits": loss, "transient": max(loss, transient) + dequantized,
            "total": kept + max(loss, transient) + dequantized}


# -- time ----------------------------------------------------------------------------------------
def step_flops(a: Arch, p: Params, shape: Shape, s: Settings, seq2seq: bool) -> dict:
    """FLOPs of one optimizer step per process: frozen matmuls forward (2N per token) and backward (input
    gradients only, 2N), attention scores (backward twice the forward), the LM head at the label rows."""
    n = sum(o * i for o, i in p.layer_linear)
    if seq2seq:
        total_layers = a.layers + a.encoder_layers
        tokens = shape.batch * (shape.seq * a.layers + shape.source * a.encoder_layers) / total_layers
    else:
        tokens = shape.batch * shape.seq
    attn = 4 * shape.batch * shape.seq * shape.keys * a.heads * a.head_dim * a.layers
    head = 2 * a.vocab * a.hidden * shape.logit_rows if a.lm_head else 0
    forward = 2 * n * tokens + attn + head
    backward = 2 * n * tokens + 2 * attn + head + (2 * n * tokens if s.fine_tune else 0)
    recompute = 2 * n * tokens + attn if s.checkpointing else 0
    return {"forward": forward * s.grad_accum, "backward": backward * s.grad_accum,
            "recompute": recompute * s.grad_accum, "total": (forward + backward + recompute) * s.grad_accum}


# -- the process baseline --------------------------------------------------------------------------
def rss() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process (Linux /proc; 0, 0 elsewhere)."""
    out = {"VmRSS": 0, "VmHWM": 0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in out:
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out["VmRSS"], out["VmHWM"]


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def load_metrics(task) -> None:
    """Load the evaluate modules the task scores with (evaluate and datasets come with them): a run loads them
    at its first evaluation, and they are part of its resident memory from then on."""
    names = {task.metric_for_best, *(getattr(task, "metrics", None) or ())}
    for module in sorted({metrics.SCORES[n] for n in names if n in metrics.SCORES}):
        metrics.load(module)


def measure_data(task, tokenizer, kind: str) -> tuple[list, dict]:
    """The task's training rows, encoded as train() encodes them, and the RSS that adds (peak, kept)."""
    before, _ = rss()
    _reset_peak()
    examples = task.train_examples(tokenizer, kind)
    after, peak = rss()
    return examples, {"peak": max(peak - before, 0), "kept": max(after - before, 0)}


# -- the plan ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    """What the plan knows of the job once built on the meta device."""

    arch: Arch
    params: Params
    seq2seq: bool
    method_info: tuple[int, int]  # (positions prepended to each row, prefix keys per layer)
    prefix_dropout: int = 0  # numbers per row of the prefix keys and values that dropout materializes (all stacks)


def refuse(cfg: DictConfig, opts: Options) -> None:
    """What `ptune train` would refuse for this device and number of processes, in its own words."""
    cuda = opts.device == "cuda"
    if cfg.trainer.precision == "fp16" and not cuda:
        raise PtuneError("trainer.precision=fp16 needs a GPU; on CPU use trainer.precision=bf16 or fp32 (or device=cuda)")
    how = cfg.model.get("quantize", "none")
    quantize.refuse(how, cfg.method.name, methods.trains_backbone(cfg.method.name), cfg.trainer.precision, cuda)
    if cfg.trainer.get("shard", "none") == "fsdp":
        shard.refuse(cfg.method.name, methods.trains_backbone(cfg.method.name), opts.processes, how != "none")


def build_model(cfg: DictConfig, config, tokenizer) -> tuple[Model, object, list[str]]:
    """(Model, task, notes) from the config: backbone, method and head on the meta device."""
    notes = []
    backbone = meta_backbone(cfg, config, tokenizer)
    method, task = meta_method(cfg, backbone)
    params = count_params(backbone.model, method)
    cls = methods.METHODS[cfg.method.name]
    if method is None:
        params = replace(params, trainable=formula_trainable(cfg, backbone))
        notes.append("the method could not be built on the meta device: its trainable numbers are counted by "
                     "formula, without the task head's")
        p = cfg.method.get("num_virtual_tokens") or 0
        info = (p if cls.acts_on == "input" else 0, p if cls.acts_on == "kv" else 0)
    else:
        info = (method.n_prepended, method.num_virtual_tokens if method.acts_on == "kv" else 0)
    arch = arch_of(config, backbone.dims, cfg.model.kind)
    dropped = 0
    if cls.acts_on == "kv" and (cfg.method.get("dropout") or 0) > 0:  # kv.to_layers: expanded, dropped, masked
        dropped = info[1] * sum(st.width for st in kv.stacks_of(backbone))
    if arch.family == "other":
        notes.append(f"{config.model_type}: activations of a generic layer (approximate; measured families: "
                     f"Llama, GPT-2, BERT)")
    return Model(arch, params, cfg.model.kind == "seq2seq", info, dropped), task, notes


def baseline(opts: Options, process: int, data: dict | None) -> dict:
    """Bytes besides the model: this process and the encoded rows on CPU; nothing counted on a GPU."""
    if opts.device == "cuda":
        return {"process": 0, "data_kept": 0, "data_peak": 0}
    data = data or {"peak": 0, "kept": 0}
    return {"process": process, "data_kept": data["kept"], "data_peak": data["peak"]}


def loading(p: Params, s: Settings, base: dict) -> float:
    """The load: models.load reads fp32 weights (on CPU from safetensors, mapped and read when first used, so
    the load's peak is the training step's); on a GPU the whole fp32 model reaches the device before store_frozen,
    while quantization moves and converts one layer linear at a time, and a sharded run converts on the host and
    moves each layer's share only (ptune.train.shard), so its device holds no more than in a step."""
    if s.mapped:
        return 0
    if s.device == "cuda" and s.shard == "fsdp":  # the host converts, fully_shard moves one layer's share at a time
        return weight_bytes(p, s)["total"]
    fp32 = 4 * p.backbone
    if s.device == "cuda" and s.quantize != "none":
        linear = sum(quantized_bytes(o, i, s.quantize) for o, i in p.layer_linear)
        rest = 4 * (p.backbone - sum(o * i for o, i in p.layer_linear))
        return linear + rest + 4 * max((o * i for o, i in p.layer_linear), default=0)
    return base["process"] + fp32


def memory(m: Model, shape: Shape, s: Settings, base: dict) -> dict:
    """Bytes per process: each part, the training step's peak, the load's, and the peak the run reports."""
    w = weight_bytes(m.params, s)
    act = activations(m.arch, m.params, shape, s, m.seq2seq, m.prefix_dropout)
    trained = 16 * m.params.trainable  # fp32 value, gradient, AdamW's two moments
    step = w["total"] + trained + act["total"] + base["process"] + base["data_kept"]
    resident = 0 if s.mapped and not w["file_pages"] else w["total"] - w["gathered_layer"]  # mapped: read at the first step
    data = base["process"] + resident + base["data_peak"]
    load = loading(m.params, s, base)
    reported = max(step, data, 0 if s.shard == "fsdp" else load)  # a sharded run resets its peak after sharding
    return {"frozen_weights": w, "trainable_state": trained, "activations": act, "baseline": base,
            "training_step": step, "data_phase": data, "loading": load, "peak_memory": reported,
            "peak_physical": max(step, data, load)}


def fits(mem: dict, s: Settings, device_memory: int) -> bool:
    return mem["peak_physical"] + (CUDA_RESERVE if s.device == "cuda" else 0) <= device_memory


def worst(m: Model, shapes: list[Shape], s: Settings) -> Shape:
    """The micro-batch whose activations are largest."""
    return max(shapes, key=lambda x: activations(m.arch, m.params, x, s, m.seq2seq, m.prefix_dropout)["total"])


VARIANTS = (("trainer.gradient_checkpointing=true", dict(checkpointing=True)),
            ("model.quantize=int8", dict(quantize="int8")), ("model.quantize=nf4", dict(quantize="nf4")),
            ("model.quantize=int4", dict(quantize="int4")))


def _allowed(s: Settings) -> bool:
    if s.quantize != "none" and (s.fine_tune or s.shard == "fsdp"):
        return False
    return s.quantize != "int4" or (s.device == "cuda" and s.precision == "bf16")


def candidates(s: Settings) -> list[tuple[str, Settings]]:
    """Single changes that lower the memory per process, in the order they are suggested."""
    out = [(k, replace(s, **c)) for k, c in VARIANTS if getattr(s, next(iter(c))) != next(iter(c.values()))]
    if s.shard == "none" and not s.fine_tune and s.quantize == "none":
        out += [(f"trainer.shard=fsdp processes={n}", replace(s, shard="fsdp", processes=n)) for n in (2, 4, 8, 16, 32)]
    out += [(f"trainer.batch_size={b} trainer.grad_accum={s.grad_accum * s.batch // b}",
             replace(s, batch=b, grad_accum=s.grad_accum * s.batch // b))
            for b in (s.batch // 2, s.batch // 4, 1) if 1 <= b < s.batch and s.batch % b == 0]
    return [(k, v) for k, v in out if _allowed(v)]


def suggest(m: Model, shapes: list[Shape], s: Settings, base: dict, device_memory: int) -> str:
    """One line: the first change, or checkpointing with one more, that makes the job fit."""
    def ok(v: Settings) -> bool:
        shape = _rebatch(worst(m, shapes, s), s.batch, v.batch)
        return fits(memory(m, shape, v, base), v, device_memory)

    single = candidates(s)
    pairs = [] if s.checkpointing else [(f"trainer.gradient_checkpointing=true {k}", replace(v, checkpointing=True))
                                        for k, v in single if not v.checkpointing]
    found = next((k for k, v in single + pairs if ok(v)), None)
    if found:
        return f"it fits with {found}"
    return "nothing tried fits (checkpointing, quantization, fsdp up to 32 processes, batch 1): it needs a larger device"


def _rebatch(shape: Shape, old: int, new: int) -> Shape:
    if old == new:
        return shape
    return replace(shape, batch=new, logit_rows=shape.logit_rows * new // old)


def shapes_and_data(cfg, opts: Options, task, tokenizer, m: Model) -> tuple[list[Shape], dict | None, int | None]:
    """The micro-batches to plan for and, on CPU, the RSS the encoded training rows add (measured)."""
    head = heads.get(task.head)
    examples = data = None
    if opts.device == "cpu" or opts.seq_len == "data":
        examples, data = measure_data(task, tokenizer, cfg.model.kind)
    if opts.seq_len == "data":
        return data_shapes(cfg, examples, m.method_info, opts.processes), data, len(examples)
    return [max_shape(cfg, cfg.model.kind, head, m.method_info, opts.seq_len)], data, \
        (len(examples) if examples is not None else None)


def time_of(m: Model, shape: Shape, s: Settings, opts: Options) -> dict:
    flops = step_flops(m.arch, m.params, shape, s, m.seq2seq)
    rate, source = opts.tflops, "tflops="
    if rate is None and s.device == "cpu":
        rate = MEASURED_TFLOPS.get(s.precision, MEASURED_TFLOPS["fp32"])
        source = "measured on this image's 2-core CPU (SmolLM2-135M steps, scripts/bench_plan.py)"
    seconds = flops["total"] / (rate * 1e12) if rate else None
    return {"flops": flops, "tflops": rate, "tflops_source": source if rate else None, "seconds_per_step": seconds}


def plan(argv: list[str]) -> dict:
    """The plan of `ptune plan <argv>` as a dict (bytes, FLOPs, seconds); PtuneError for bad input."""
    overrides, own = split_args(argv)
    opts = options(own)
    cfg = compose(overrides)
    check(cfg)
    refuse(cfg, opts)
    config, tokenizer, note = model_config(cfg)
    m, task, notes = build_model(cfg, config, tokenizer)
    if opts.device == "cpu":
        load_metrics(task)
    process, _ = rss()  # python, torch, transformers, ptune, the tokenizer, the metrics: what a training process holds
    s = settings_of(cfg, opts, methods.METHODS[cfg.method.name].acts_on)
    shapes, data, n_rows = shapes_and_data(cfg, opts, task, tokenizer, m)
    shape = worst(m, shapes, s)
    base = baseline(opts, process, data)
    mem = memory(m, shape, s, base)
    ok = fits(mem, s, opts.device_memory)
    return {"job": _job(cfg, opts, s, shape, n_rows, len(shapes)), "parameters": _params(m.params),
            "memory": mem, "device_memory": opts.device_memory, "fits": ok,
            "suggestion": None if ok else suggest(m, shapes, s, base, opts.device_memory),
            "time": time_of(m, shape, s, opts), "notes": [n for n in [note, *notes] if n]}


def _job(cfg, opts: Options, s: Settings, shape: Shape, n_rows, n_shapes: int) -> dict:
    return {"method": cfg.method.name, "model": cfg.model.name, "task": cfg.task.name, "device": opts.device,
            "processes": opts.processes, "precision": s.precision, "frozen_dtype": s.frozen, "attention": s.attention,
            "gradient_checkpointing": s.checkpointing, "quantize": s.quantize, "shard": s.shard,
            "batch_size": shape.batch, "grad_accum": s.grad_accum, "seq": shape.seq, "keys": shape.keys,
            "source": shape.source, "logit_rows": shape.logit_rows, "lengths_from": shape.how,
            "training_rows": n_rows, "micro_batch_shapes": n_shapes}


def _params(p: Params) -> dict:
    linear = sum(o * i for o, i in p.layer_linear)
    return {"total": p.total, "trainable": p.trainable, "backbone": p.backbone, "layers": p.layers,
            "layer_matmul": linear, "layer_bias": p.layer_bias, "layer_other": p.layer_other,
            "outside_matmul": p.outer_linear, "outside_other": p.outer_other, "lm_head_tied_fp32": p.lm_head_fp32,
            "trainable_in_backbone": p.trainable_in_backbone}


# -- output --------------------------------------------------------------------------------------
def _mb(x: float) -> str:
    return f"{x / MB:,.1f}"


def render(result: dict) -> str:
    """The plan as the table `ptune plan` prints."""
    j, p, t = result["job"], result["parameters"], result["time"]
    lines = [_headline(j), f"parameters: {p['total']:,} total, {p['trainable']:,} trainable "
             f"({100 * p['trainable'] / max(p['total'], 1):.3f}%); frozen layer matmuls {p['layer_matmul']:,} in "
             f"{p['layers']} layers, outside them {p['outside_matmul'] + p['outside_other']:,}",
             "memory per process (MB):"]
    lines += [f"  {name:<34}{_mb(value):>12}  {why}" for name, value, why in _rows(result)]
    verdict = "fits" if result["fits"] else "does NOT fit"
    lines.append(f"  -> {verdict} in {_mb(result['device_memory'])} MB of {j['device']} memory"
                 + (f" (keeping {_mb(CUDA_RESERVE)} for the CUDA context)" if j["device"] == "cuda" else ""))
    if result["suggestion"]:
        lines.append(f"  suggestion: {result['suggestion']}")
    lines.append(_time_line(t))
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def _headline(j: dict) -> str:
    extra = [f"+{j['keys'] - j['seq']} prefix keys" if j["keys"] > j["seq"] and not j["source"] else "",
             f"encoder {j['source']}" if j["source"] else "", f"{j['logit_rows']} logit rows" if j["logit_rows"] else ""]
    keys = [f"{k}={j[k]}" for k in ("precision", "frozen_dtype", "attention", "quantize", "shard") if j[k] not in ("none",)]
    return (f"ptune plan: {j['method']} on {j['model']} / {j['task']}, {j['device']}, {j['processes']} process(es); "
            f"micro-batch {j['batch_size']} x {j['seq']} tokens ({', '.join(x for x in extra if x) or 'no logits'}; "
            f"{j['lengths_from']}); {' '.join(keys)}; checkpointing {'on' if j['gradient_checkpointing'] else 'off'}")


def _rows(result: dict) -> list[tuple[str, float, str]]:
    mem, j = result["memory"], result["job"]
    w, act, base = mem["frozen_weights"], mem["activations"], mem["baseline"]
    return [
        ("frozen weights", w["total"], f"layers {_mb(w['layers'])}" + (f" (1/{j['processes']} each)" if j["shard"] == "fsdp" else "")
         + f", outside {_mb(w['outside'])}" + (f", one gathered layer {_mb(w['gathered_layer'])}" if w["gathered_layer"] else "")
         + (f", + the fp32 file's pages {_mb(w['file_pages'])} (still mapped)" if w["file_pages"] else "")),
        ("trainable + grads + AdamW", mem["trainable_state"], f"{result['parameters']['trainable']:,} x 16 bytes"),
        ("activations", act["total"], f"kept {_mb(act['kept'])} + largest transient {_mb(act['transient'])} "
                                      f"(one layer {_mb(act['layer'])}, loss {_mb(act['logits'])})"),
        ("process baseline", base["process"] + base["data_kept"],
         f"process {_mb(base['process'])} + encoded rows {_mb(base['data_kept'])}, measured now" if j["device"] == "cpu"
         else "not in torch.cuda.max_memory_allocated"),
        ("training step", mem["training_step"], "the sum"),
        ("loading", mem["loading"], "its shares converted on the host, moved layer by layer" if (j["device"], j["shard"]) ==
         ("cuda", "fsdp") else "fp32 weights as read" + (" (whole, each process in turn)" if j["shard"] == "fsdp" else "")),
        ("peak (peak_memory_mb)", mem["peak_memory"], "what summary.json will report"
         + (" (reset after sharding)" if j["shard"] == "fsdp" else "")),
    ]


def _time_line(t: dict) -> str:
    f = t["flops"]
    parts = f"forward {f['forward'] / 1e12:.3f}, backward {f['backward'] / 1e12:.3f}" + (
        f", recompute {f['recompute'] / 1e12:.3f}" if f["recompute"] else "")
    if t["seconds_per_step"] is None:
        return f"time: {f['total'] / 1e12:.3f} TFLOP per optimizer step ({parts}); give tflops=<sustained TFLOPS> for seconds"
    return (f"time: {f['total'] / 1e12:.3f} TFLOP per optimizer step ({parts}) -> {t['seconds_per_step']:.2f} s at "
            f"{t['tflops']:g} TFLOPS ({t['tflops_source']})")


def run(argv: list[str]) -> str:
    """`ptune plan`'s output: the table, or with format=json the plan as JSON."""
    fmt = next((a.partition("=")[2] for a in argv if a.startswith("format=")), "text")
    result = plan(argv)
    return json.dumps(result, indent=2, default=float) if fmt == "json" else render(result)
