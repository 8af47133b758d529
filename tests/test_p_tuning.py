"""Level 2: P-tuning on tiny decoder-only backbones (GPT-2, Llama with grouped-query attention),
with prompts prepended (E2E today) and at soft positions anywhere in the input: counts, the
encoders, soft positions, PEFT's P-tuning, and what its adapter holds; plus level 4 (resumed ==
uninterrupted through the CLI). What every method proves on every backbone (frozen weights, a
falling loss, the adapter round trip, padding, greedy and beam, P-tuning's soft positions
included): test_contract.py."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, assert_same_tensors, crash_after_checkpoint, encoder_count, load, metrics_of
from ptune.adapter import save_adapter, load_adapter
from ptune import methods
from ptune.cli import main
from ptune.errors import PtuneError
from ptune.methods.p_tuning import insert_soft

BACKBONES = ["tiny-gpt2", "tiny-llama"]
ENCODERS = ["lstm", "mlp"]


def ptuning(backbone, p=5, **kw):
    torch.manual_seed(0)
    return methods.build("p-tuning", backbone, num_virtual_tokens=p, **kw)


def soft_rows(tok):
    """Two rows with 5 soft positions each: before, between and after segments (different splits)."""
    a, b, c = (tok(s).input_ids for s in ("name : Eagle", " | food : French", " The Eagle"))
    return [insert_soft([a, b, c], [2, 1, 0, 2]), insert_soft([c, a], [1, 3, 1])]


def soft_batch(rows, pad_id, side="right"):
    """input_ids, attention_mask, soft_mask (batch, width) from insert_soft rows."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask, soft = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    for r, (i, s) in enumerate(rows):
        sl = slice(0, len(i)) if side == "right" else slice(width - len(i), width)
        ids[r, sl], mask[r, sl], soft[r, sl] = torch.tensor(i), 1, torch.tensor(s)
    return ids, mask, soft


def logits(method, input_ids, attention_mask, soft_mask=None):
    return method.backbone.model(**method.model_inputs(input_ids, attention_mask, soft_mask)).logits


@pytest.mark.parametrize("encoder, width", [("lstm", None), ("lstm", 32), ("mlp", None), ("mlp", 48)])
def test_parameter_counts(backbone, encoder, width):
    H = backbone.dims.hidden
    m = ptuning(backbone, p=7, encoder=encoder, encoder_hidden_size=width)
    E = width or H
    assert sum(t.numel() for t in m.trainable_tensors().values()) == 7 * H + encoder_count(encoder, H, E)
    closed = {"lstm": 8 * (E // 2) * H + 32 * (E // 2) ** 2 + 32 * (E // 2) + E * E + E + E * H + H,
              "mlp": 2 * E * H + E * E + 2 * E + H}[encoder]  # the formula in the module docstring
    assert closed == encoder_count(encoder, H, E)
    assert {k: tuple(v.shape) for k, v in m.adapter_tensors().items()} == {"prompt": (7, H)}  # stored = p x hidden


def test_paper_lstm_shapes(backbone):
    """Default lstm = the paper's LAMA encoder: LSTM(H, H // 2, 2 layers, bidirectional), Linear(H, H) x 2."""
    H = backbone.dims.hidden
    m = ptuning(backbone)
    assert (m.lstm_head.input_size, m.lstm_head.hidden_size, m.lstm_head.num_layers) == (H, H // 2, 2)
    assert m.lstm_head.bidirectional and m.lstm_head.dropout == 0
    assert [tuple(x.weight.shape) for x in m.mlp_head if isinstance(x, torch.nn.Linear)] == [(H, H), (H, H)]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-t5", "tiny-bart", "tiny-bert"])
def test_the_adapter_holds_the_prompt_alone(name, tmp_path):
    """The encoder is training state: the adapter holds its output, the (p x hidden) prompt, and a
    method loaded from it has no encoder and nothing to train."""
    m = ptuning(load(name))
    save_adapter(tmp_path / "adapter", m.adapter_tensors(), m.adapter_config())
    assert list(load_file(tmp_path / "adapter" / "adapter_model.safetensors")) == ["prompt"]  # encoder dropped
    m2 = ptuning(load(name))
    _, tensors = load_adapter(tmp_path / "adapter")
    m2.load_adapter_tensors(tensors)
    assert not list(m2.trainable_tensors()) and not hasattr(m2, "lstm_head")


def test_insert_soft_places_prompts_before_between_and_after():
    ids, soft = insert_soft([[11, 12], [13], [14, 15]], [2, 1, 0, 2], filler_id=7)
    assert ids == [7, 7, 11, 12, 7, 13, 14, 15, 7, 7]
    assert soft == [True, True, False, False, True, False, False, False, True, True]
    assert insert_soft([[11]], [0, 0]) == ([11], [False])
    with pytest.raises(PtuneError, match="3 counts"):
        insert_soft([[11], [12]], [1, 1])


def test_soft_positions_match_manually_built_inputs_embeds(backbone):
    """The i-th soft position of every row carries prompt vector i; nothing is prepended."""
    m = ptuning(backbone)
    pad = backbone.tokenizer.pad_token_id
    rows = soft_rows(backbone.tokenizer)
    ids, mask, soft = soft_batch(rows, pad, "left")
    with torch.no_grad():
        ours = logits(m, ids, mask, soft)
        assert m.n_prepended == 0 and ours.shape[1] == ids.shape[1]
        prompt = m.adapter_tensors()["prompt"]  # (p, hidden)
        table = backbone.model.get_input_embeddings()
        for i, (row_ids, row_soft) in enumerate(rows):
            row = table(torch.tensor([row_ids]))[0].clone()  # (len, hidden)
            where = [j for j, s in enumerate(row_soft) if s]
            assert len(where) == 5
            for k, j in enumerate(where):
                row[j] = prompt[k]
            ref = backbone.model(inputs_embeds=row[None], position_ids=torch.arange(len(row_ids))[None]).logits[0]
            torch.testing.assert_close(ours[i][mask[i].bool()], ref, atol=1e-5, rtol=1e-5)
        # the soft positions' ids are never read
        assert torch.equal(ours, logits(m, ids.masked_fill(soft, 123), mask, soft))


def test_bad_soft_masks_and_values(backbone):
    m = ptuning(backbone)
    ids, mask, soft = soft_batch(soft_rows(backbone.tokenizer), backbone.tokenizer.pad_token_id)
    with pytest.raises(PtuneError, match="exactly method.num_virtual_tokens=5"):
        m.model_inputs(ids, mask, soft & (soft.cumsum(-1) <= 4))
    with pytest.raises(PtuneError, match="padded positions"):
        m.model_inputs(ids, mask.masked_fill(soft, 0), soft)
    with pytest.raises(PtuneError, match="method.encoder='gru'"):
        ptuning(backbone, encoder="gru")
    with pytest.raises(PtuneError, match="even integer"):
        ptuning(backbone, encoder="lstm", encoder_hidden_size=33)


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("encoder", ENCODERS)
def test_matches_peft_p_tuning(name, encoder):
    """PEFT's P_TUNING with the same encoder weights gives the same logits (unpadded input).

    mlp: PEFT's MLP encoder, same width. lstm: PEFT's LSTM encoder with encoder_hidden_size = E/2
    (PEFT counts units per direction) is the paper's encoder."""
    peft = pytest.importorskip("peft")
    bb = load(name)
    H = bb.dims.hidden
    m = ptuning(bb, p=4, encoder=encoder, encoder_hidden_size=48 if encoder == "mlp" else None)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    config = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_reparameterization_type=encoder.upper(),
                                      encoder_hidden_size=48 if encoder == "mlp" else H // 2)
    pm = peft.get_peft_model(load(name).model, config)
    pm.prompt_encoder["default"].load_state_dict(m.state_dict())  # same names: embedding, lstm_head, mlp_head
    ids = torch.tensor([bb.tokenizer("name : Eagle | food : French. The Eagle").input_ids])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = logits(m, ids, mask)[:, 4:]
        theirs = pm(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:]
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_resumed_equals_uninterrupted(in_tmp, data_dir, monkeypatch):
    """Through the CLI: a run killed after its step-3 checkpoint and resumed equals an unbroken one."""
    args = ["train", "model=tiny-gpt2", "method=p-tuning", *TINY, "task.metrics=[bleu]"]
    assert main(args) == 0
    [full] = sorted(p for p in (in_tmp / "outputs").glob("*/*") if p.is_dir())
    restore = crash_after_checkpoint(monkeypatch, 3)
    assert main(args) == 130
    restore()
    broken = next(p for p in (in_tmp / "outputs").glob("*/*") if p.is_dir() and p != full)
    assert main(["train", f"resume={broken}"]) == 0
    assert list(load_file(full / "adapter/adapter_model.safetensors")) == ["prompt"]
    assert "lstm_head.weight_ih_l0" in load_file(full / "checkpoints/step-6/trainable.safetensors")
    assert_same_tensors(full, broken)
    assert metrics_of(full) == metrics_of(broken)
