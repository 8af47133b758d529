"""The template language (ptune/tasks/templates.py): slots, whitespace, soft positions, truncation, errors."""

import pytest

from ptune.errors import PtuneError
from ptune.models import load_tokenizer
from ptune.tasks.templates import Template


@pytest.fixture(scope="module")
def bert_tok():
    return load_tokenizer("minilm", "")  # WordPiece, [CLS] x [SEP], has [MASK]


@pytest.fixture(scope="module")
def bpe_tok():
    return load_tokenizer("smollm2", "")  # byte-level BPE, adds no special tokens, no mask token


def test_parts_fields_mask_and_soft():
    t = Template("{sentence} It was {mask} .")
    assert [(p.kind, p.value, p.space) for p in t.parts] == [
        ("field", "sentence", ""), ("text", " It was", ""), ("mask", "mask", " "), ("text", " .", "")]  # slot name
    assert [p.value for p in Template("{x} {mask:a} and {mask:b}").parts if p.kind == "mask"] == ["a", "b"]
    assert t.fields == ["sentence"] and t.has_mask and t.mask_space == " " and t.n_soft == 0
    t = Template("{soft:3} {sub} {soft:3} {mask} .")
    assert t.n_soft == 6 and t.fields == ["sub"]
    assert Template("{soft} {x}").n_soft == 1
    assert Template("{{literal}} {x}").render({"x": "a"}) == "{literal} a"
    assert Template("{premise} ? {mask} , {hypothesis}").render({"premise": "P", "hypothesis": "H"}) == "P ? [MASK] , H"


def test_encode_bert_places_mask_specials_and_words(bert_tok):
    t = Template("{sentence} It was {mask} .")
    enc = t.encode(bert_tok, {"sentence": "a fine film"}, 32, mask_id=bert_tok.mask_token_id)
    assert bert_tok.convert_ids_to_tokens(enc.ids) == ["[CLS]", "a", "fine", "film", "it", "was", "[MASK]", ".", "[SEP]"]
    assert enc.mask_pos == 6 and not any(enc.soft)
    # the same ids as tokenizing the whole sentence: per-part tokenization changes nothing here
    assert enc.ids == bert_tok("a fine film It was [MASK] .").input_ids


def test_encode_bpe_keeps_the_space_before_each_part(bpe_tok):
    t = Template("{sentence} It was {mask} .")
    enc = t.encode(bpe_tok, {"sentence": "A fine film"}, 32, mask_id=0)
    whole = bpe_tok("A fine film It was", add_special_tokens=False).input_ids
    assert enc.ids[:enc.mask_pos] == whole  # " It" with its space, as in running text
    assert enc.ids[enc.mask_pos + 1:] == bpe_tok(" .", add_special_tokens=False).input_ids


def test_soft_positions_kept_for_p_tuning_and_left_out_otherwise(bpe_tok):
    t = Template("{soft:3} {sub} {soft:2} {mask} .")
    enc = t.encode(bpe_tok, {"sub": "Dante"}, 32, keep_soft=True, mask_id=0)
    n_sub = len(bpe_tok(" Dante", add_special_tokens=False).input_ids)
    assert enc.soft == [True] * 3 + [False] * n_sub + [True] * 2 + [False] * (len(enc.ids) - 5 - n_sub)
    assert enc.mask_pos == 5 + n_sub
    plain = t.encode(bpe_tok, {"sub": "Dante"}, 32, keep_soft=False, mask_id=0)
    assert not any(plain.soft) and len(plain.ids) == len(enc.ids) - 5 and plain.mask_pos == n_sub


def test_truncation_cuts_the_longest_field_never_the_template(bert_tok):
    t = Template("{premise} ? {mask} , {hypothesis}")
    row = {"premise": " ".join(["word"] * 50), "hypothesis": "a short one"}
    enc = t.encode(bert_tok, row, 16, mask_id=bert_tok.mask_token_id)
    toks = bert_tok.convert_ids_to_tokens(enc.ids)
    # 16 = [CLS] ? [MASK] , [SEP] (5, never cut) + the hypothesis (3, the shorter: kept) + 8 premise tokens
    assert toks == ["[CLS]"] + ["word"] * 8 + ["?", "[MASK]", ",", "a", "short", "one", "[SEP]"]
    assert enc.mask_pos == 10
    # two long fields: both shrink, to within one token of each other
    enc = t.encode(bert_tok, {"premise": "x " * 40, "hypothesis": "y " * 40}, 21, mask_id=bert_tok.mask_token_id)
    toks = bert_tok.convert_ids_to_tokens(enc.ids)
    assert len(enc.ids) == 21 and abs(toks.count("x") - toks.count("y")) <= 1


@pytest.mark.parametrize("source, words", [
    ("{text", "unmatched '{'"),
    ("{1abc} {mask}", "is not a slot"),
    ("{a} {mask} {mask}", "2 {mask} slots"),
    ("{soft:0} {a}", "has no positions"),
    ("", "is empty"),
])
def test_bad_templates_are_one_line(source, words):
    with pytest.raises(PtuneError, match="task.template") as e:
        Template(source)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_field_and_mask_checks_name_the_fix(bert_tok):
    with pytest.raises(PtuneError, match=r"names the field 'text', which task sst2 rows lack; use \{sentence\}"):
        Template("Review: {text} {mask}").check_fields(["sentence"], "sst2")
    with pytest.raises(PtuneError, match=r"has no \{mask\}, which task.head=verbalizer needs"):
        Template("{sentence}").require_mask("task.head=verbalizer")
    with pytest.raises(PtuneError, match="task.max_len=6 leaves no room"):
        Template("{a} is a long set of template words {mask} .").encode(bert_tok, {"a": "x"}, 6, mask_id=103)
