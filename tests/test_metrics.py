"""ptune.metrics: the `evaluate` modules shipped in ptune/metrics/modules, on hand-made inputs.

Every expected value is worked out by hand in the comment beside it. The E2E scores' known case
is in test_metrics_e2e.py (the values of the official scripts), run there through these modules too.
"""
import socket

import pytest

from ptune import metrics


def test_every_module_loads_from_ptune_with_evaluate_and_no_network(monkeypatch):
    evaluate = pytest.importorskip("evaluate")

    def no_network(*a, **kw):
        raise AssertionError("a metric tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(metrics, "_LOADED", {})
    assert set(metrics.MODULES) == {p.name for p in metrics.MODULE_DIR.iterdir() if (p / f"{p.name}.py").is_file()}
    for name in metrics.MODULES:
        module = metrics.load(name)
        assert isinstance(module, evaluate.EvaluationModule), name
    # and the plain evaluate call on the folder works as well
    direct = evaluate.load(str(metrics.module_path("accuracy")), keep_in_memory=True)
    assert direct.compute(predictions=[1, 0], references=[1, 1]) == {"accuracy": 0.5}


def test_accuracy():
    # labels 0 0 1 2 2 2 vs 0 1 1 2 2 0: items 1, 3, 4, 5 right -> 4/6
    assert metrics.compute("accuracy", [0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0]) == {"accuracy": pytest.approx(4 / 6)}
    assert metrics.compute("accuracy", ["pos", "neg"], ["pos", "pos"]) == {"accuracy": 0.5}


def test_macro_f1():
    # class 0: tp 1, predicted 2, true 2 -> F1 = 2*1/(2+2) = 0.5
    # class 1: tp 1, predicted 1, true 2 -> 2/3;  class 2: tp 2, predicted 3, true 2 -> 4/5
    pred, gold = [0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0]
    assert metrics.compute("macro_f1", pred, gold)["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)
    # a listed class that never occurs counts with F1 = 0 (scikit-learn's zero_division=0)
    assert metrics.compute("macro_f1", pred, gold, labels=[0, 1, 2, 3])["macro_f1"] == \
        pytest.approx((0.5 + 2 / 3 + 0.8) / 4)
    # string labels (CB); all right -> 1.0; a class only ever predicted, never true: F1 0
    labels = ["entailment", "contradiction", "neutral"]
    assert metrics.compute("macro_f1", labels, labels)["macro_f1"] == 1.0
    # entailment: tp 1, pred 1, true 2 -> 2/3; neutral: tp 0 -> 0
    assert metrics.compute("macro_f1", ["entailment", "neutral"], ["entailment", "entailment"])["macro_f1"] == \
        pytest.approx((2 / 3 + 0) / 2)


def test_precision_at_1():
    # ranked candidates: only the first counts -> Paris right, Rome wrong, Berlin wrong: 1/3
    ranked = [["Paris", "Lyon"], ["Rome", "Milan"], ["Berlin", "Bonn"]]
    assert metrics.compute("precision_at_1", ranked, ["Paris", "Milan", "Bonn"]) == \
        {"precision_at_1": pytest.approx(1 / 3)}
    assert metrics.compute("precision_at_1", ["Paris", "Rome"], ["Paris", "Milan"]) == {"precision_at_1": 0.5}


def test_rouge_hand_cases():
    # "the cat sat on the mat" vs "the cat lay on the mat" (6 tokens each, none stemmed: <= 3 chars)
    #   rouge1: overlap the x2, cat, on, mat = 5 -> P = R = F = 5/6
    #   rouge2: bigrams (the cat), (on the), (the mat) shared of 5 each -> 3/5
    #   rougeL: LCS "the cat on the mat" = 5 -> 5/6
    one = metrics.compute("rouge", ["the cat sat on the mat"], [["the cat lay on the mat"]])
    assert one == pytest.approx({"rouge1": 5 / 6, "rouge2": 0.6, "rougeL": 5 / 6})
    # "Police arrested two men." vs "Two men were arrested by police on Tuesday."
    # tokens (lowercased, Porter-stemmed when > 3 chars): polic arrest two men / two men were arrest by
    # polic on tuesday (4 vs 8)
    #   rouge1: all 4 found -> P 1, R 1/2, F 2/3
    #   rouge2: (two men) only -> P 1/3, R 1/7, F 2(1/21)/(10/21) = 0.2
    #   rougeL: LCS "two men" = 2 -> P 1/2, R 1/4, F 1/3
    two = metrics.compute("rouge", ["Police arrested two men."],
                          [["Two men were arrested by police on Tuesday."]])
    assert two == pytest.approx({"rouge1": 2 / 3, "rouge2": 0.2, "rougeL": 1 / 3})
    # the corpus score is the mean over items; a bare string reference is one reference
    both = metrics.compute("rouge", ["the cat sat on the mat", "Police arrested two men."],
                           ["the cat lay on the mat", "Two men were arrested by police on Tuesday."])
    assert both == pytest.approx({k: (one[k] + two[k]) / 2 for k in one})


def test_rouge_stemming_and_several_references():
    # "cats" (4 chars) stems to "cat"; without the stemmer only "the" matches: F = 1/2
    assert metrics.compute("rouge", ["the cats"], [["the cat"]])["rouge1"] == 1.0
    assert metrics.compute("rouge", ["the cats"], [["the cat"]], use_stemmer=False)["rouge1"] == 0.5
    # several references: the best F per score (ref 1: P 1, R 3/4 -> F 6/7; ref 2: 0)
    assert metrics.compute("rouge", ["a b c"], [["x y", "a b c d"]])["rouge1"] == pytest.approx(6 / 7)


def test_scores_by_name_in_order():
    got = metrics.scores(["rougeL", "rouge1"], ["the cat sat on the mat"], [["the cat lay on the mat"]])
    assert list(got) == ["rougeL", "rouge1"] and got["rougeL"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="unknown metrics"):
        metrics.scores(["bleurt"], ["a"], [["a"]])


def test_bad_input_is_refused():
    with pytest.raises(ValueError):  # evaluate checks the inputs against the module's features
        metrics.compute("accuracy", [[1, 2]], [1])
    with pytest.raises(ValueError):
        metrics.compute("bleu", ["a"], [["a"], ["b"]])
