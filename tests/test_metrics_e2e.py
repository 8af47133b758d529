"""Tests of ptune.metrics.e2e (official E2E NLG Challenge scores).

Expected values come from hand computation (shown in comments) or from the reference tools:
  * BLEU/NIST: the scoring subroutines of e2e-metrics' mteval/mteval-v13a-sig.pl (copied
    verbatim; only the SGML reader replaced by a driver fed the same padded reference sets that
    e2e-metrics' create_mteval_file writes), run with perl 5.36;
  * ROUGE-L/CIDEr/METEOR: pycocoevalcap 1.2 from PyPI (Java PTBTokenizer of Stanford CoreNLP
    3.4.1, Rouge, Cider, Meteor with meteor-1.5.jar), run with OpenJDK 17.
The same harness (kept outside the repository) matched this module to <1e-12 on the E2E test
set (616 MRs, 1-44 references each, one reference held out as the hypothesis).
"""
import math
import shutil
import subprocess

import pytest

from ptune.metrics import e2e
from ptune.metrics.e2e import MetricUnavailable

# The fixed case: 3 hypotheses with 2-3 references each.
HYPS = [
    "The Eagle is a cheap coffee shop near Burger King.",
    "Zizzi is a family-friendly pub in the city centre.",
    "There is a French restaurant called The Mill (rated 5 out of 5).",
]
REFS = [
    ["The Eagle is a low-priced coffee shop near Burger King.",
     "Near Burger King, The Eagle coffee shop is cheap."],
    ["Zizzi is a kid friendly pub located in the city centre.",
     "In the city centre there is a family-friendly pub called Zizzi.",
     "Zizzi pub is family-friendly."],
    ["The Mill is a French restaurant with a customer rating of 5 out of 5.",
     "The Mill serves French food and is rated 5 out of 5."],
]
EXPECTED = {
    "bleu": 0.561394374933,     # mteval-v13a-sig.pl subroutines (perl)
    "nist": 5.167066559748,     # mteval-v13a-sig.pl subroutines (perl)
    "rouge_l": 0.754354447039,  # pycocoevalcap Rouge after the Java PTBTokenizer
    "cider": 4.250015382882,    # pycocoevalcap Cider after the Java PTBTokenizer
    "meteor": 0.423900584956,   # pycocoevalcap Meteor (meteor-1.5.jar) after the Java PTBTokenizer
}


@pytest.mark.parametrize("name", ["bleu", "nist", "rouge_l", "cider"])
def test_fixed_case_pure_python(name):
    assert getattr(e2e, name)(HYPS, REFS) == pytest.approx(EXPECTED[name], abs=1e-9)


# Starting METEOR costs ~8 s of JVM time (it loads a 60 MB paraphrase table), which alone would
# take this file past its 10 s budget, so the real-jar check is a slow test (pytest -m slow).
@pytest.mark.slow
def test_fixed_case_all_scores_with_meteor():
    scores = e2e.e2e_scores(HYPS, REFS)
    assert set(scores) == {"bleu", "nist", "meteor", "rouge_l", "cider"}
    if isinstance(scores["meteor"], dict):  # no Java or no jar on this machine
        assert "unavailable" in scores["meteor"]
        pytest.skip(scores["meteor"]["unavailable"])
    for name, value in EXPECTED.items():
        assert scores[name] == pytest.approx(value, abs=1e-9), name


def test_meteor_unavailable_without_java(monkeypatch):
    monkeypatch.setattr(e2e.shutil, "which", lambda name: None)
    monkeypatch.setattr(e2e, "_meteor_jar", lambda: "/nonexistent/meteor-1.5.jar")
    with pytest.raises(MetricUnavailable, match="Java"):
        e2e.meteor(HYPS, REFS)
    scores = e2e.e2e_scores(HYPS, REFS)
    assert "Java" in scores["meteor"]["unavailable"]
    assert scores["bleu"] == pytest.approx(EXPECTED["bleu"], abs=1e-9)


@pytest.mark.slow  # METEOR's JVM
def test_meteor_keeps_one_jvm_and_each_call_stands_alone():
    """The JVM starts once per process; a later call scores as a fresh JVM does; a dead one is restarted."""
    try:
        first = e2e.meteor(HYPS, REFS)
    except MetricUnavailable as e:
        pytest.skip(e.reason)
    proc = e2e._METEOR["proc"]
    one = e2e.meteor(HYPS[:1], REFS[:1])
    assert e2e.meteor(HYPS, REFS) == first and e2e._METEOR["proc"] is proc
    proc.kill()
    proc.wait()
    assert e2e.meteor(HYPS[:1], REFS[:1]) == one and e2e._METEOR["proc"] is not proc  # a fresh JVM, the same score


def test_meteor_unavailable_without_jar(monkeypatch):
    monkeypatch.setattr(e2e.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MetricUnavailable, match="meteor-1.5.jar"):
        e2e.meteor(HYPS, REFS)


def test_identical_gives_one():
    hyps = ["The Eagle is a pub near the river.", "Zizzi serves cheap food."]
    refs = [[h] for h in hyps]
    assert e2e.bleu(hyps, refs) == pytest.approx(1.0)
    assert e2e.rouge_l(hyps, refs) == pytest.approx(1.0)


def test_single_item_cider_is_zero():
    # idf = log(#items / df) = log(1/1) = 0 for every n-gram, as in pycocoevalcap.
    assert e2e.cider(["the eagle is a pub"], [["the eagle is a pub"]]) == 0.0


def test_brevity_penalty():
    # All n-gram precisions are 1; c = 5, r = 8: BP = exp(1 - 8/5) = exp(-0.6) = 0.5488116361
    assert e2e.bleu(["the eagle is a pub"], [["the eagle is a pub near the river"]]) == \
        pytest.approx(math.exp(-0.6), abs=1e-12)


def test_closest_reference_length_tie_takes_shorter():
    # c = 5, references of 6 and 4 words are equally close: mteval takes 4, so BP = 1
    # (taking 6 would give exp(1 - 6/5) = 0.8187).
    hyps = ["the eagle is a pub"]
    assert e2e.bleu(hyps, [["the eagle is a pub here", "eagle is a pub"]]) == pytest.approx(1.0)


def test_bleu_smoothing_of_missing_order():
    # hyp "the pub is cheap" vs "the pub is very cheap": p1 = 4/4, p2 = 2/3, p3 = 1/2 and no
    # 4-gram match (0/1), which mteval-v13a's default BLEU smooths to 1/(2*1).
    # BLEU = (1 * 2/3 * 1/2 * 1/2) ** (1/4) * exp(1 - 5/4) = 0.4976093899 (perl: 0.497609389925)
    expected = (1 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25 * math.exp(1 - 5 / 4)
    assert e2e.bleu(["the pub is cheap"], [["the pub is very cheap"]]) == \
        pytest.approx(expected, abs=1e-12)


def test_empty_hypotheses_give_zero():
    hyps, refs = ["", ""], [["the eagle is a pub"], ["a cheap pub", "zizzi"]]
    assert e2e.bleu(hyps, refs) == 0.0
    assert e2e.nist(hyps, refs) == 0.0
    assert e2e.rouge_l(hyps, refs) == 0.0
    assert e2e.cider(hyps, refs) == 0.0


def test_nist_hand_cases():
    # One item "a b" vs "a b": info(a) = info(b) = log2(2/1) = 1, info(a b) = log2(1/1) = 0;
    # NIST = (1 + 1) / 2 words = 1.0
    assert e2e.nist(["a b"], [["a b"]]) == pytest.approx(1.0)
    # Variable reference counts: e2e-metrics pads to 2 reference sets, so the average reference
    # length is 10 words / 2 = 5 and the 4 hypothesis words get the length penalty
    # exp(-beta ln(0.8)^2), beta = ln 2 / ln(1.5)^2. Unigram info over the 10 reference words:
    # a, b: log2(10/1); c, d: log2(10/2); bigrams carry 0. (perl: 2.287556580294)
    beta = math.log(2) / math.log(1.5) ** 2
    info = (2 * math.log2(10) + 2 * math.log2(5)) / 4
    expected = info * math.exp(-beta * math.log(0.8) ** 2)
    got = e2e.nist(["a b", "c d"], [["a b"], ["c d", "c d e f g h"]])
    assert got == pytest.approx(expected, abs=1e-12)
    assert got == pytest.approx(2.287556580294, abs=1e-9)


def test_rouge_l_hand_case_and_max_p_max_r():
    # LCS("the eagle is a pub", "the eagle is a coffee shop") = 4: P = 4/5, R = 4/6,
    # F = (1 + 1.2^2) P R / (R + 1.2^2 P) = 0.7155425220
    p, r = 4 / 5, 4 / 6
    f = (1 + 1.44) * p * r / (r + 1.44 * p)
    assert e2e.rouge_l(["the eagle is a pub"], [["the eagle is a coffee shop"]]) == \
        pytest.approx(f, abs=1e-12)
    # pycocoevalcap combines the best precision (ref 2: 1.0) with the best recall (ref 1: 1.0),
    # so this scores 1.0 although neither reference alone does.
    assert e2e.rouge_l(["the eagle pub is cheap"],
                       [["the eagle", "the eagle pub is cheap and near the river"]]) == 1.0


def test_bleu_matches_sacrebleu_with_equal_reference_counts():
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps = ["The Eagle is a cheap coffee shop near Burger King.",
            "Zizzi is a family-friendly pub in the city centre.",
            "The Mill serves French food, rated 5 out of 5."]
    refs = [["The Eagle is a low-priced coffee shop near Burger King.",
             "Near Burger King, The Eagle coffee shop is cheap."],
            ["Zizzi is a kid friendly pub located in the city centre.",
             "In the city centre there is a family-friendly pub called Zizzi."],
            ["The Mill is a French restaurant with a customer rating of 5 out of 5.",
             "The Mill serves French food and is rated 5 out of 5."]]
    # mteval lowercases by default; every n-gram order has matches, so smoothing is moot.
    ref_streams = [list(s) for s in zip(*refs)]
    sb = sacrebleu.corpus_bleu(hyps, ref_streams, tokenize="13a", lowercase=True,
                               smooth_method="none")
    assert e2e.bleu(hyps, refs) == pytest.approx(sb.score / 100, abs=1e-6)


def test_rouge_and_cider_match_pycocoevalcap_scorers():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    gts = {i: [e2e.ptb_tokenize(r) for r in rs] for i, rs in enumerate(REFS)}
    res = {i: [e2e.ptb_tokenize(h)] for i, h in enumerate(HYPS)}
    assert e2e.rouge_l(HYPS, REFS) == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
    assert e2e.cider(HYPS, REFS) == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)


PTB_CASES = [
    "Zizzi's pub isn't cheap; it's rated 5 out of 5 (high) and \"kid friendly\".",
    "Near The Rice Boat, there's a low-priced pub... It has a 1/5 rating.",
    "It is located in the city center., near Café Rouge. Price range: £20-25!",
    "Can't won't cannot 'Strada' is a 3-star venue at St. Mary's, e.g. 1,000 seats.",
]


def test_ptb_tokenize_known_outputs():
    # Outputs of the Java PTBTokenizer (-preserveLines -lowerCase) minus pycocoevalcap's
    # punctuation list; note -lrb-/-rrb- survive (the list has them in upper case).
    assert e2e.ptb_tokenize(PTB_CASES[0]) == (
        "zizzi 's pub is n't cheap it 's rated 5 out of 5 -lrb- high -rrb- and kid friendly")
    assert e2e.ptb_tokenize(PTB_CASES[2]) == (
        "it is located in the city center. near café rouge price range # 20-25")


def test_ptb_tokenize_matches_java_tokenizer():
    pytest.importorskip("pycocoevalcap")
    import importlib.util
    import os
    base = list(importlib.util.find_spec("pycocoevalcap").submodule_search_locations)[0]
    jar = os.path.join(base, "tokenizer", "stanford-corenlp-3.4.1.jar")
    if shutil.which("java") is None or not os.path.isfile(jar):
        pytest.skip("needs Java and the CoreNLP jar")
    out = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
                          "-preserveLines", "-lowerCase"], input="\n".join(PTB_CASES),
                         capture_output=True, text=True, encoding="utf-8", check=True).stdout
    drop = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
            "-", "--", "...", ";"}
    java = [" ".join(w for w in line.rstrip().split(" ") if w not in drop)
            for line in out.split("\n")[:len(PTB_CASES)]]
    assert [e2e.ptb_tokenize(s) for s in PTB_CASES] == java


def test_mteval_tokenize():
    # 13a: punctuation split except . and , between digits; dash split after a digit;
    # only ASCII letters lowercased (Perl tr/[A-Z]/[a-z]/).
    assert e2e.mteval_tokenize("ÉCOLE Café costs £20-25, i.e. 3.5/5!") == \
        ["École", "café", "costs", "£20", "-", "25", ",", "i", ".", "e", ".",
         "3.5", "/", "5", "!"]


def test_input_validation():
    with pytest.raises(ValueError):
        e2e.bleu(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        e2e.rouge_l(["a"], [[]])
    with pytest.raises(ValueError):
        e2e.cider([], [])


# -- the same scores as shipped `evaluate` modules (what the E2E task calls) ----------------------------
@pytest.mark.parametrize("name", ["bleu", "nist", "rouge_l", "cider"])
def test_fixed_case_through_the_evaluate_modules(name):
    from ptune import metrics

    assert metrics.compute(name, HYPS, REFS) == {name: pytest.approx(EXPECTED[name], abs=1e-9)}


def test_meteor_module_reports_unavailable_not_a_number(monkeypatch):
    from ptune import metrics

    monkeypatch.setattr(e2e.shutil, "which", lambda name: None)  # the module calls ptune.metrics.e2e
    monkeypatch.setattr(e2e, "_meteor_jar", lambda: "/nonexistent/meteor-1.5.jar")
    got = metrics.scores(["bleu", "meteor"], HYPS, REFS)
    assert got["meteor"] == {"unavailable": "METEOR 1.5 needs a Java runtime; `java` is not on PATH"}
    assert got["bleu"] == pytest.approx(EXPECTED["bleu"], abs=1e-9)


@pytest.mark.slow  # starts the METEOR JVM (~8 s)
def test_fixed_case_meteor_through_the_evaluate_module():
    from ptune import metrics

    got = metrics.compute("meteor", HYPS, REFS)["meteor"]
    if isinstance(got, dict):
        pytest.skip(got["unavailable"])
    assert got == pytest.approx(EXPECTED["meteor"], abs=1e-9)
