"""Proof 3 of the method matrix for every method on every tiny backbone: the trainable and stored
counts equal the closed forms of docs/methods.md, which scripts/param_table.py prints for the real
models (test_formula_equals_the_methods), and docs/methods.md carries the tables it prints. The
other proofs (frozen weights, a falling loss, the adapter round trip, padding, greedy and beam) are
test_contract.py's, for every registered method on every tiny backbone; PEFT's equality and each
method's own counts stay in the per-method files.
"""

import pytest

from conftest import ROOT, load, load_script

param_table = load_script("param_table")

BACKBONES = ["tiny-gpt2", "tiny-llama", "tiny-t5", "tiny-bart", "tiny-bert"]


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
