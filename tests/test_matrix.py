"""The proof matrix of issue 3: methods x tiny backbones x proofs, which test proves each cell,
and the tests for the cells no per-method file covered.

Proofs (the issue's numbering): 1 `frozen` (every frozen weight bitwise unchanged, gradients only
in the method's tensors and the head), 2 `loss` (falls on a small learnable task), 3 `counts`
(trainable and stored equal the formula), 4 `reload` (save, load into a fresh backbone,
identical logits), 5 `padding` (alone == inside a left- and a right-padded batch), 6 `peft`
(same tensors, same logits as PEFT, where PEFT implements the method), and `greedy` / `beam`
(generate() against decoding by hand, where the backbone generates). BERT is an encoder: its
cells are classification through the linear head, and it does not generate.

`AUDIT` names, per cell and proof, the test that proves it; `test_the_audit_covers_every_cell`
fails when a cell has no test or a named test no longer exists. The gaps found by the audit are
filled below: BERT with a linear head under prompt, prefix, p-tuning and p-tuning-v2 with its
projection (`test_bert_classification_cell`), generation under p-tuning-v2 and beam search under
fine-tune (`test_generation_cell`), and the parameter formulas of every cell, which
scripts/param_table.py prints for the real models (`test_formula_equals_the_methods`).
"""

import ast
import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from ptune.adapter import save_adapter, load_adapter
from ptune import methods
from ptune.heads import LinearHead, class_logits, class_loss, seq2seq_forward
from ptune.adapter import adapter_tensors, load_adapter_tensors
from test_p_tuning_v2 import SENTENCES, class_batch
from test_prefix import load, toy_batch
from test_prompt import best_of_two_step_beam
from test_prompt_seq2seq_masked import sharpened

_spec = importlib.util.spec_from_file_location("param_table", ROOT / "scripts" / "param_table.py")
param_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(param_table)

METHODS = ["fine-tune", "prompt", "prefix", "p-tuning", "p-tuning-v2"]
CAUSAL, SEQ2SEQ, BERT = ["tiny-gpt2", "tiny-llama"], ["tiny-t5", "tiny-bart"], ["tiny-bert"]
BACKBONES = CAUSAL + SEQ2SEQ + BERT
PROOFS = ["frozen", "loss", "counts", "reload", "padding", "peft", "greedy", "beam"]
# Where PEFT computes the same thing (the proof 6, and p-tuning-v2 = PEFT's prefix without projection)
PEFT_CELLS = {("prompt", b) for b in BACKBONES} | {("p-tuning", b) for b in BACKBONES} | \
    {("prefix", b) for b in CAUSAL} | {("p-tuning-v2", b) for b in CAUSAL + BERT}
ME = "test_matrix.py"
FORMULA = f"{ME}::test_formula_equals_the_methods"


def _cells(files: str, names: dict) -> dict:
    return {proof: f"{files}::{test}" for proof, test in names.items()}


# (methods, backbones) -> {proof: "file::test"}. Proof 3 is also checked for every cell by FORMULA.
AUDIT = [
    (["fine-tune"], CAUSAL, _cells("test_fine_tune.py", dict(
        frozen="test_training_changes_only_the_selected_tensors", loss="test_full_fine_tuning_loss_falls",
        counts="test_parameter_counts", reload="test_adapter_roundtrip_gives_identical_logits",
        padding="test_padding_does_not_change_logits", greedy="test_generate_returns_the_greedy_continuation"))
     | {"beam": f"{ME}::test_generation_cell"}),
    (["fine-tune"], SEQ2SEQ, _cells("test_seq2seq.py", dict(
        frozen="test_training_changes_only_the_selected_tensors_and_loss_falls",
        loss="test_training_changes_only_the_selected_tensors_and_loss_falls", counts="test_parameter_counts",
        reload="test_adapter_roundtrip_gives_identical_logits", padding="test_padding_does_not_change_logits",
        greedy="test_greedy_and_beam_generate_new_tokens_only", beam="test_greedy_and_beam_generate_new_tokens_only"))),
    (["fine-tune"], BERT, _cells("test_seq2seq.py", dict(
        frozen="test_masked_fine_tune_trains_the_encoder_selection_and_the_task_head",
        loss="test_masked_fine_tune_trains_the_encoder_selection_and_the_task_head",
        counts="test_masked_fine_tune_trains_the_encoder_selection_and_the_task_head",
        reload="test_masked_fine_tune_roundtrip_and_padding", padding="test_masked_fine_tune_roundtrip_and_padding"))),
    (["prompt"], CAUSAL, _cells("test_prompt.py", dict(
        frozen="test_training_touches_only_the_prompt_and_loss_falls",
        loss="test_training_touches_only_the_prompt_and_loss_falls", counts="test_parameter_counts",
        reload="test_adapter_roundtrip_gives_identical_logits", padding="test_padding_does_not_change_logits",
        peft="test_matches_peft_prompt_tuning", greedy="test_generate_matches_step_by_step_greedy",
        beam="test_beam_search_through_inputs_embeds"))),
    (["prompt"], SEQ2SEQ, _cells("test_prompt_seq2seq_masked.py", dict(
        frozen="test_training_touches_only_the_prompt_and_loss_falls",
        loss="test_training_touches_only_the_prompt_and_loss_falls", counts="test_parameter_counts",
        reload="test_adapter_roundtrip_gives_identical_logits", padding="test_padding_does_not_change_logits",
        peft="test_matches_peft_prompt_tuning", greedy="test_generate_matches_step_by_step_greedy",
        beam="test_beam_search"))),
    (["prompt"], BERT, _cells("test_prompt_seq2seq_masked.py", dict(  # there through the MLM head (a cloze)
        counts="test_parameter_counts", peft="test_matches_peft_prompt_tuning"))),
    (["prefix"], CAUSAL, _cells("test_prefix.py", dict(
        frozen="test_training_touches_only_the_prefix_and_loss_falls",
        loss="test_training_touches_only_the_prefix_and_loss_falls", counts="test_parameter_counts",
        reload="test_adapter_roundtrip_gives_identical_logits", padding="test_padding_does_not_change_logits",
        peft="test_matches_peft_prefix_tuning", greedy="test_generate_matches_step_by_step_greedy",
        beam="test_beam_search_with_prefix"))),
    (["prefix"], SEQ2SEQ, _cells("test_prefix_seq2seq.py", dict(  # PEFT: only the decoder's prefix (tested there too)
        frozen="test_training_touches_only_the_prefixes_and_loss_falls",
        loss="test_training_touches_only_the_prefixes_and_loss_falls", counts="test_parameter_counts",
        reload="test_adapter_roundtrip_gives_identical_logits", padding="test_padding_does_not_change_logits",
        greedy="test_greedy_generate_matches_step_by_step_argmax", beam="test_beam_search_with_prefix"))),
    (["prefix"], BERT, {"counts": FORMULA}),
    (["p-tuning"], CAUSAL, _cells("test_p_tuning.py", dict(
        frozen="test_training_touches_only_the_encoder_and_loss_falls",
        loss="test_training_touches_only_the_encoder_and_loss_falls", counts="test_parameter_counts",
        reload="test_adapter_roundtrip_gives_identical_logits", padding="test_padding_does_not_change_logits",
        peft="test_matches_peft_p_tuning", greedy="test_generate_matches_step_by_step_greedy",
        beam="test_beam_search"))),
    (["p-tuning"], SEQ2SEQ, _cells("test_p_tuning_seq2seq_masked.py", dict(
        frozen="test_training_touches_only_the_encoder_and_loss_falls",
        loss="test_training_touches_only_the_encoder_and_loss_falls", counts="test_parameter_counts",
        reload="test_adapter_roundtrip_gives_identical_logits", padding="test_padding_does_not_change_logits",
        peft="test_matches_peft_p_tuning", greedy="test_generate_matches_step_by_step_greedy",
        beam="test_beam_search"))),
    (["p-tuning"], BERT, _cells("test_p_tuning_seq2seq_masked.py", dict(  # there through the MLM head (a cloze)
        counts="test_parameter_counts", peft="test_matches_peft_p_tuning"))),
    (["prompt", "prefix", "p-tuning"], BERT, {p: f"{ME}::test_bert_classification_cell"
                                              for p in ("frozen", "loss", "reload", "padding")}),
    (["p-tuning-v2"], BACKBONES, _cells("test_p_tuning_v2.py", dict(
        frozen="test_prompts_alone_move_the_classifier_and_weights_stay_frozen",
        loss="test_prompts_alone_move_the_classifier_and_weights_stay_frozen", counts="test_parameter_counts",
        reload="test_adapter_roundtrip_gives_identical_logits", padding="test_padding_does_not_change_logits"))),
    (["p-tuning-v2"], BERT, {"peft": "test_p_tuning_v2.py::test_bert_matches_peft_prefix_tuning"}),
    (["p-tuning-v2"], CAUSAL, {"peft": "test_export.py::test_export_loads_in_peft_with_ptune_logits"}),
    (["p-tuning-v2"], CAUSAL + SEQ2SEQ, {"greedy": f"{ME}::test_generation_cell", "beam": f"{ME}::test_generation_cell"}),
]


def applies(method: str, backbone: str, proof: str) -> bool:
    if proof == "peft":
        return (method, backbone) in PEFT_CELLS
    if proof in ("greedy", "beam"):
        return backbone not in BERT
    return True


def test_the_audit_covers_every_cell():
    covered: dict = {}
    for ms, bs, proofs in AUDIT:
        for m in ms:
            for b in bs:
                for proof, where in proofs.items():
                    assert applies(m, b, proof), (m, b, proof)
                    covered[m, b, proof] = where
    missing = [(m, b, p) for m in METHODS for b in BACKBONES for p in PROOFS if applies(m, b, p) and (m, b, p) not in covered]
    assert not missing, f"cells without a proving test: {missing}"
    tests = {}
    for where in set(covered.values()):
        file, name = where.split("::")
        if file not in tests:
            tree = ast.parse((Path(__file__).parent / file).read_text())
            tests[file] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert name in tests[file], f"{where} does not exist"


# -- proof 3 for every cell: the formulas of docs/methods.md against the methods -----------------
@pytest.fixture(scope="module")
def backbones():
    return {name: load(name) for name in BACKBONES}


@pytest.mark.parametrize("name", BACKBONES)
def test_formula_equals_the_methods(backbones, name):
    """scripts/param_table.py's closed forms equal the trainable and stored counts of every method
    variant it tabulates (head included on BERT), on the tiny models' own configs."""
    bb = backbones[name]
    for p in (3, 7):
        for label, method, kw in param_table.VARIANTS:
            assert param_table.formula(method, bb.model.config, p, **kw) == param_table.measured(method, bb, p, **kw), \
                (label, p)
    for label, kw in param_table.FINE_TUNE:
        assert param_table.formula("fine-tune", bb.model.config, **kw) == param_table.measured("fine-tune", bb, **kw), label
    assert not any(p.requires_grad for p in bb.model.parameters())


def test_the_docs_table_is_the_scripts():
    """docs/methods.md carries the tables scripts/param_table.py prints (from the same formulas, on the
    real models' configs), so a change of a method's counts cannot leave the page behind."""
    table = param_table.markdown(param_table.formula_rows(param_table.real_configs()))
    assert table.strip() in (ROOT / "docs" / "methods.md").read_text(), "rerun scripts/param_table.py into docs/methods.md"


# -- proofs 1, 2, 4, 5 on BERT with the linear head -------------------------------------------------
P = 4
CLASS_CELLS = {"prompt": {}, "prefix": {}, "p-tuning": {}, "p-tuning-v2, projection": dict(projection=True)}


def classifier(cell: str, bb, head_seed: int = 0):
    torch.manual_seed(0)
    m = methods.build(cell.split(",")[0], bb, num_virtual_tokens=P, **CLASS_CELLS[cell])
    m.attach_head(LinearHead(bb.dims.hidden, 2, dropout=0.0, seed=head_seed))
    return m


def logits_of(m, batch):
    return class_logits(m, batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("cell", CLASS_CELLS)
def test_bert_classification_cell(cell, tmp_path):
    bb = sharpened("tiny-bert")  # BERT's own N(0, 0.02) init leaves [CLS] nearly the same for every input
    m = classifier(cell, bb)
    frozen = {k: v.clone() for k, v in bb.model.state_dict().items()}
    batch = class_batch(bb.tokenizer)
    # 1: one backward with the head trainable: gradients in the method's tensors and the head, none in BERT
    loss, n = class_loss(m, batch["input_ids"], batch["attention_mask"], batch["labels"])
    (loss / n).backward()
    trained = m.trainable_tensors()
    assert {"head.weight", "head.bias"} < set(trained)
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in trained.values())
    assert all(p.grad is None for p in bb.model.parameters())
    m.zero_grad(set_to_none=True)
    # 2: the method alone lowers the loss: the head is fixed at unit scale, so only the method moves the logits
    with torch.no_grad():
        m.head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    m.head.requires_grad_(False)
    own = [t for t in m.trainable_tensors().values()]
    opt = torch.optim.AdamW(own, lr=5e-2)
    losses = []
    for _ in range(8):
        loss, n = class_loss(m, batch["input_ids"], batch["attention_mask"], batch["labels"])
        (loss / n).backward()
        assert all(p.grad is None for p in bb.model.parameters())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item() / n)
    # measured drops in 8 steps: prompt 0.83, prefix (with its MLP) 3.6, p-tuning 2.6 nats (0.10-0.22 at
    # BERT's own init, where [CLS] hardly depends on the input)
    assert losses[-1] < losses[0] - 0.5, losses
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, frozen[k]), f"frozen weight {k} changed"
    # 4: the adapter (method tensors + head.*) into a fresh backbone with another head: identical logits
    save_adapter(tmp_path, adapter_tensors(m), m.adapter_config())
    m2 = classifier(cell, sharpened("tiny-bert"), head_seed=1)
    load_adapter_tensors(m2, load_adapter(tmp_path)[1])
    assert not list(m2.trainable_tensors())
    with torch.no_grad():
        assert torch.equal(logits_of(m, batch), logits_of(m2, batch))
        # 5: each sentence alone == inside a left- and a right-padded batch
        for side in ("left", "right"):
            full = logits_of(m, class_batch(bb.tokenizer, side=side))
            for i, text in enumerate(SENTENCES):
                alone = logits_of(m, class_batch(bb.tokenizer, [text], [0]))[0]
                torch.testing.assert_close(full[i], alone, atol=1e-5, rtol=1e-5)


# -- generation: greedy and beam where no per-method file decodes --------------------------------
GEN_CELLS = [("p-tuning-v2", b) for b in CAUSAL + SEQ2SEQ] + [("fine-tune", b) for b in CAUSAL]
GEN = dict(do_sample=False, eos_token_id=None, forced_eos_token_id=None)


@pytest.mark.parametrize("method, name", GEN_CELLS)
def test_generation_cell(method, name):
    """From a left-padded batch, greedy decoding equals argmax steps on each row alone, and width-3
    beam search over two steps returns the best path it can see (found by hand on the row alone)."""
    bb = load(name) if name in CAUSAL else sharpened(name)  # seq2seq: see `sharpened` (flat logits otherwise)
    torch.manual_seed(0)
    m = methods.build(method, bb, **({"num_virtual_tokens": P} if method != "fine-tune" else {}))
    tok = bb.tokenizer
    exs = toy_batch(tok)
    rows = [e.input_ids for e in exs] if name in CAUSAL else [tok(s).input_ids for s in ("name : Eagle | food : French", "name : Mill")]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    start = bb.model.config.decoder_start_token_id if name in SEQ2SEQ else None

    def next_logprobs(i, new):
        """(vocab,) log-probabilities after row i (alone, unpadded) and the new tokens."""
        src = torch.tensor([rows[i]])
        with torch.no_grad():
            if name in SEQ2SEQ:
                out = seq2seq_forward(m, src, torch.ones_like(src), torch.tensor([[start, *new]])).logits
            else:
                seq = torch.cat([src, torch.tensor([new], dtype=torch.long)], 1)
                out = bb.model(**m.model_inputs(seq, torch.ones_like(seq))).logits
        return out[0, -1].log_softmax(-1)

    kw = dict(pad_token_id=tok.pad_token_id, **GEN)
    greedy = m.generate(ids, mask, max_new_tokens=4, num_beams=1, **kw)
    for i in range(len(rows)):
        new = []
        for _ in range(4):
            new.append(int(next_logprobs(i, new).argmax()))
        assert greedy[i].tolist() == new
    beams = m.generate(ids, mask, max_new_tokens=2, num_beams=3, **kw)
    assert beams.shape == (len(rows), 2)
    for i in range(len(rows)):
        assert beams[i].tolist() == best_of_two_step_beam(lambda prefix, i=i: next_logprobs(i, prefix), 3)
