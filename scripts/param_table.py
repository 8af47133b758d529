"""Trainable and stored parameter counts of every method on the real backbones: computed, not typed.

    .venv/bin/python scripts/param_table.py        # prints the Markdown tables of docs/methods.md

For gpt2, bert-base, t5-small, bart-base and smollm2-135m it builds the architecture from its
config on the meta device (shapes only: no weights, no memory, no download), instantiates each
ptune method on it and counts what it trains (`trainable_tensors()`) and what its adapter stores
(`ptune.train.adapter_tensors`, the task head included). It also computes both numbers from the
closed-form formulas below (`formula`), written from the architectures and the method files'
headers, and stops with an error if the two disagree anywhere. tests/test_matrix.py checks
`formula` against the methods built on the tiny models, so the table cannot drift from the code.

BERT has no decoder: ptune trains it for classification only, through a 2-class linear head
(`task.head=linear`, C*d + C parameters), which every BERT count here includes. The other
backbones count the method alone (the LM head, frozen, generates).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ptune import methods  # noqa: E402
from ptune.heads.linear import LinearHead  # noqa: E402
from ptune.models import Backbone, dims_of  # noqa: E402
from ptune.adapter import adapter_tensors  # noqa: E402

N_CLASSES = 2  # the linear head of a binary task (SST-2) on BERT
MID_DIM = 512  # the prefix reparameterization MLP's hidden size (Li & Liang; conf/method/prefix.yaml)

# (label, method, kwargs): the rows of the tables. p-tuning-v2 without projection is the prefix
# computation without its MLP; its own row states so.
VARIANTS = [
    ("prompt", "prompt", dict(init="random")),
    ("p-tuning, lstm encoder (paper)", "p-tuning", dict(encoder="lstm")),
    ("p-tuning, mlp encoder (PEFT)", "p-tuning", dict(encoder="mlp")),
    ("prefix, MLP reparameterization (paper)", "prefix", dict(projection=True)),
    ("prefix without MLP = p-tuning-v2 (paper)", "p-tuning-v2", dict(projection=False)),
    ("p-tuning-v2, projection=true", "p-tuning-v2", dict(projection=True)),
]
FINE_TUNE = [("fine-tune, trainable=all", dict(trainable="all")), ("fine-tune, trainable=head", dict(trainable="head")),
             ("fine-tune, trainable=top-k, k=2 (FT-top2)", dict(trainable="top-k", k=2))]


# -- the closed forms ---------------------------------------------------------------------------
def shape(config) -> dict:
    """The numbers the formulas need, read from a transformers config (one family per model_type)."""
    c, t = config, config.model_type
    if t == "gpt2":
        return dict(kind="causal", V=c.vocab_size, d=c.n_embd, L=c.n_layer, heads=c.n_head, kv=c.n_head,
                    hd=c.n_embd // c.n_head, ff=c.n_inner or 4 * c.n_embd, P=c.n_positions, tied=c.tie_word_embeddings)
    if t == "llama":
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return dict(kind="causal", V=c.vocab_size, d=c.hidden_size, L=c.num_hidden_layers, heads=c.num_attention_heads,
                    kv=c.num_key_value_heads, hd=hd, ff=c.intermediate_size, tied=c.tie_word_embeddings)
    if t == "bert":
        return dict(kind="masked", V=c.vocab_size, d=c.hidden_size, L=c.num_hidden_layers, heads=c.num_attention_heads,
                    kv=c.num_attention_heads, hd=c.hidden_size // c.num_attention_heads, ff=c.intermediate_size,
                    P=c.max_position_embeddings, T=c.type_vocab_size)
    if t == "t5":
        return dict(kind="seq2seq", V=c.vocab_size, d=c.d_model, L=c.num_decoder_layers, L_enc=c.num_layers,
                    heads=c.num_heads, hd=c.d_kv, ff=c.d_ff, buckets=c.relative_attention_num_buckets,
                    gated=c.is_gated_act, tied=c.tie_word_embeddings)
    if t == "bart":
        return dict(kind="seq2seq", V=c.vocab_size, d=c.d_model, L=c.decoder_layers, L_enc=c.encoder_layers,
                    heads=c.decoder_attention_heads, heads_enc=c.encoder_attention_heads, hd=c.d_model // c.decoder_attention_heads,
                    ff=c.decoder_ffn_dim, ff_enc=c.encoder_ffn_dim, P=c.max_position_embeddings, tied=c.tie_word_embeddings)
    raise ValueError(f"no formula for model_type {t!r}")


def backbone_parts(config) -> dict:
    """Parameter counts of the backbone's parts: every parameter once (`total`, a tied matrix once),
    persistent buffers (`buffers`), the output head (`head`: the LM head, or BERT's task head),
    the (decoder) blocks in order, bottom first (`blocks`), the final norm after them (`norm`), and for BERT
    the MLM head that a task head replaces (`unused`: trained by no method, stored by trainable=all)."""
    s, t = shape(config), config.model_type
    V, d, L = s["V"], s["d"], s["L"]
    lm_head = V * d
    if t == "gpt2":
        ff = s["ff"]
        # ln_1, c_attn (d -> 3d), c_proj (d -> d), ln_2, c_fc (d -> ff), c_proj (ff -> d), all with biases
        block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * ff + ff) + (ff * d + d)
        total = V * d + s["P"] * d + L * block + 2 * d + (0 if s["tied"] else lm_head)
        return dict(total=total, buffers=0, head=lm_head, blocks=[block] * L, norm=2 * d, unused=0)
    if t == "llama":
        q, kv, ff = s["heads"] * s["hd"], s["kv"] * s["hd"], s["ff"]
        block = d * q + 2 * d * kv + q * d + 3 * d * ff + 2 * d  # q, k, v, o; gate, up, down; two RMSNorms (no biases)
        total = V * d + L * block + d + (0 if s["tied"] else lm_head)
        return dict(total=total, buffers=0, head=lm_head, blocks=[block] * L, norm=d, unused=0)
    if t == "bert":
        ff = s["ff"]
        embeddings = V * d + s["P"] * d + s["T"] * d + 2 * d  # word, position, token type, LayerNorm
        layer = 4 * (d * d + d) + 2 * d + (d * ff + ff) + (ff * d + d) + 2 * d  # q k v o, LN, intermediate, output, LN
        task_head = N_CLASSES * d + N_CLASSES
        mlm = (d * d + d) + 2 * d + V  # transform dense + LayerNorm, decoder bias (its weight is the word embeddings)
        return dict(total=embeddings + L * layer + task_head, buffers=0, head=task_head, blocks=[layer] * L, norm=0,
                    unused=mlm)
    if t == "t5":
        inner, ff = s["heads"] * s["hd"], (3 if s["gated"] else 2) * d * s["ff"]
        bias = s["buckets"] * s["heads"]  # relative attention bias, in the first block of each stack
        enc_block = 4 * d * inner + d + ff + d  # self-attention q k v o + its norm, feed-forward + its norm
        dec_block = 8 * d * inner + 2 * d + ff + d  # self- and cross-attention, three norms
        total = (V * d + s["L_enc"] * enc_block + bias + d + L * dec_block + bias + d + (0 if s["tied"] else lm_head))
        blocks = [dec_block + bias] + [dec_block] * (L - 1)  # bottom first: block 0 holds the bias
        return dict(total=total, buffers=0, head=lm_head, blocks=blocks, norm=d, unused=0)
    if t == "bart":
        def layer(ff, cross):
            attention = 4 * (d * d + d) + 2 * d  # q k v o with biases, LayerNorm
            return attention * (2 if cross else 1) + (d * ff + ff) + (ff * d + d) + 2 * d
        positions = 2 * ((s["P"] + 2) * d + 2 * d)  # learned positions (offset 2) + layernorm_embedding, per stack
        total = V * d + positions + s["L_enc"] * layer(s["ff_enc"], False) + L * layer(s["ff"], True)
        return dict(total=total + (0 if s["tied"] else lm_head), buffers=V, head=lm_head,  # buffer: final_logits_bias
                    blocks=[layer(s["ff"], True)] * L, norm=0, unused=0)
    raise ValueError(f"no formula for model_type {t!r}")


def prefix_widths(config) -> list[int]:
    """One flat prefix row per attention stack: 2 * layers * kv_heads * head_dim (kv.Stack.width)."""
    s = shape(config)
    if s["kind"] != "seq2seq":
        return [2 * s["L"] * s["kv"] * s["hd"]]
    enc_hd = s["hd"] if config.model_type == "t5" else s["d"] // s["heads_enc"]
    enc_heads = s.get("heads_enc", s["heads"])
    return [2 * s["L_enc"] * enc_heads * enc_hd, 2 * s["L"] * s["heads"] * s["hd"], 2 * s["L"] * s["heads"] * s["hd"]]


def formula(method: str, config, p: int = 10, **kw) -> tuple[int, int]:
    """(trainable, stored) from the closed forms of the method files' headers."""
    s, parts = shape(config), backbone_parts(config)
    d = s["d"]
    head = parts["head"] if s["kind"] == "masked" else 0  # BERT: the task head trains and is stored too
    if method == "fine-tune":
        trainable = kw.get("trainable", "all")
        if trainable == "all":
            return parts["total"], parts["total"] + parts["buffers"] + parts["unused"]
        if trainable == "head":
            return parts["head"], parts["head"]
        n = sum(parts["blocks"][-kw.get("k", 2):]) + parts["norm"] + parts["head"]
        return n, n
    if method == "prompt":
        return p * d + head, p * d + head
    if method == "p-tuning":
        E = kw.get("encoder_hidden_size") or d
        if kw.get("encoder", "lstm") == "lstm":
            h = E // 2  # units per direction
            encoder = 8 * h * d + 32 * h * h + 32 * h + E * E + E + E * d + d
        else:
            encoder = 2 * E * d + E * E + 2 * E + d
        return p * d + encoder + head, p * d + head
    if method in ("prefix", "p-tuning-v2"):
        widths = prefix_widths(config)
        stored = sum(p * w for w in widths)
        projection = kw.get("projection", method == "prefix")
        E, M = kw.get("embed_dim") or d, kw.get("mid_dim", MID_DIM)
        trainable = sum(p * E + E * M + M + M * w + w for w in widths) if projection else stored
        return trainable + head, stored + head
    raise ValueError(f"no formula for method {method!r}")


# -- the methods themselves -----------------------------------------------------------------------
def measured(method: str, backbone: Backbone, p: int = 10, **kw) -> tuple[int, int]:
    """(trainable, stored) of the method built on backbone, as summary.json reports them."""
    torch.manual_seed(0)
    m = methods.build(method, backbone, num_virtual_tokens=p, **kw)
    if backbone.kind == "masked":  # BERT trains through a linear head, as ptune.build attaches it
        m.attach_head(LinearHead(backbone.dims.hidden, N_CLASSES, seed=0))
    trainable = sum(t.numel() for t in m.trainable_tensors().values())
    stored = sum(t.numel() for t in adapter_tensors(m).values())
    backbone.model.requires_grad_(False)  # fine-tune switched some on: leave the backbone frozen
    return trainable, stored


def real_configs() -> dict:
    """The published architectures, from their configs' values (nothing downloaded)."""
    from transformers import BartConfig, BertConfig, GPT2Config, LlamaConfig, T5Config

    return {
        "gpt2": GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
        "bert-base": BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2),
        "t5-small": T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6,
                             num_heads=8, relative_attention_num_buckets=32, feed_forward_proj="relu",
                             tie_word_embeddings=True, decoder_start_token_id=0),
        "bart-base": BartConfig(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
                                encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                                decoder_ffn_dim=3072, max_position_embeddings=1024),
        "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                    num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                    max_position_embeddings=8192, tie_word_embeddings=True),
    }


KIND = {"gpt2": "causal", "llama": "causal", "bert": "masked", "t5": "seq2seq", "bart": "seq2seq"}


def meta_backbone(name: str, config) -> Backbone:
    """The architecture with meta tensors: every shape, no storage."""
    from ptune.models import auto_class

    kind = KIND[config.model_type]
    with torch.device("meta"):
        # eager attention: sdpa's mask builder reads values (Tensor.item), which meta tensors have not,
        # in the one-token pass fine-tune's top-k makes to find the final norm
        model = auto_class(kind).from_config(config, attn_implementation="eager")
    model.requires_grad_(False)
    model.eval()
    return Backbone(model=model, tokenizer=None, dims=dims_of(model.config, kind), kind=kind, name=name)


def cases(ps=(10, 100)) -> list[tuple[str, str, dict, int | None]]:
    """The table's rows: (label, method, kwargs, p), p None for fine-tuning."""
    return [(label, name, kw, p) for p in ps for label, name, kw in VARIANTS] + \
        [(label, "fine-tune", kw, None) for label, kw in FINE_TUNE]


def rows(backbones: dict, ps=(10, 100)) -> list[tuple[str, int | None, dict]]:
    """[(row label, p or None, {model: (trainable, stored)})], each number checked formula == method."""
    out = []
    for label, name, kw, p in cases(ps):
        cells = {}
        for model, bb in backbones.items():
            want = formula(name, bb.model.config, p or 10, **kw)
            got = measured(name, bb, p or 10, **kw)
            if want != got:
                raise SystemExit(f"{label}, p={p}, {model}: formula gives {want}, the method {got}; fix the formula")
            cells[model] = got
        out.append((label, p, cells))
    return out


def formula_rows(configs: dict, ps=(10, 100)) -> list[tuple[str, int | None, dict]]:
    """The same table from the formulas alone (no model built): what tests compare docs/methods.md with."""
    return [(label, p, {model: formula(name, config, p or 10, **kw) for model, config in configs.items()})
            for label, name, kw, p in cases(ps)]


def markdown(table: list[tuple[str, int | None, dict]]) -> str:
    models = list(table[0][2])
    lines = []
    for p in sorted({p for _, p, _ in table if p}) + [None]:
        title = f"p = {p} virtual tokens" if p else "fine-tuning (no virtual tokens)"
        lines += [f"**{title}** (trainable / stored)", "", "| method | " + " | ".join(models) + " |",
                  "|---|" + "---:|" * len(models)]
        for label, q, cells in table:
            if q == p:
                lines.append(f"| {label} | " + " | ".join(f"{t:,} / {s:,}" for t, s in cells.values()) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    backbones = {name: meta_backbone(name, config) for name, config in real_configs().items()}
    print(markdown(rows(backbones)))


if __name__ == "__main__":
    main()
