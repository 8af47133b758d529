"""Prompt ensembles (ptune.ensemble, `ptune eval run=a,b,c ensemble=vote|mean`): vote and mean on
hand-worked probabilities; every member's score from the one batched pass equals `ptune eval` of
that run alone; the ensemble is its members' majority; runs that do not share a task are refused.
Run directories are written directly (config.yaml + adapter/ with random tensors), as a finished
run leaves them, without training."""

import json
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf


from ptune.adapter import save_adapter
from ptune.cli import compose, main
from ptune.infer.ensemble import combine, mean, vote
from ptune.errors import PtuneError
from ptune.adapter import adapter_tensors
from ptune.build import build
from ptune.infer.evaluate import evaluate_run

EVAL = ["task.max_eval_samples=24", "trainer.eval_batch_size=5"]


def make_run(directory, overrides: list[str], seed: int):
    """A finished run's directory with adapter tensors ~ N(0, 1) (so that members really differ)."""
    cfg = compose(overrides + EVAL)
    _, method, task = build(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    config = {**method.adapter_config(), "base_model": cfg.model.name, "task": cfg.task.name}
    save_adapter(directory / "adapter", adapter_tensors(method), config)
    return str(directory)


# -- the combination rules, by hand -----------------------------------------------------------------
# 3 members, 4 examples, 3 classes
PROBS = torch.tensor([
    [[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.1, 0.2, 0.7], [0.4, 0.35, 0.25]],  # member 1: argmax 0, 0, 2, 0
    [[0.5, 0.4, 0.1], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1]],    # member 2: argmax 0, 1, 1, 1
    [[0.1, 0.8, 0.1], [0.4, 0.5, 0.1], [0.2, 0.2, 0.6], [0.2, 0.2, 0.6]],    # member 3: argmax 1, 1, 2, 2
])


def test_vote_takes_the_majority_and_breaks_ties_by_summed_probability():
    # example 0: votes 0,0,1 -> 0 (although the summed probability of class 1, 1.5, beats class 0's 1.2)
    # example 1: votes 0,1,1 -> 1;  example 2: votes 2,1,2 -> 2
    # example 3: votes 0,1,2, a three-way tie; summed probabilities 0.8, 1.25, 0.95 -> 1
    assert vote(PROBS).tolist() == [0, 1, 2, 1]
    assert combine(PROBS, "vote").tolist() == [0, 1, 2, 1]


def test_mean_takes_the_argmax_of_the_mean_probability():
    # mean over members: ex 0 (0.4, 0.5, 0.1) -> 1; ex 1 (0.333, 0.567, 0.1) -> 1;
    # ex 2 (0.2, 0.333, 0.467) -> 2; ex 3 (0.267, 0.417, 0.317) -> 1
    assert mean(PROBS).tolist() == [1, 1, 2, 1]
    assert combine(PROBS, "mean").tolist() == [1, 1, 2, 1]


def test_an_exact_tie_goes_to_the_lower_class():
    probs = torch.tensor([[[0.7, 0.3]], [[0.3, 0.7]]])  # one vote each, equal sums
    assert vote(probs).tolist() == [0] and mean(probs).tolist() == [0]


def test_unknown_rule_is_refused():
    with pytest.raises(PtuneError, match="ensemble='max': choose vote"):
        combine(PROBS, "max")


# -- members in one pass == each run alone ------------------------------------------------------------
MEMBERS = {
    # causal, linear head: three methods and prompt lengths on one backbone
    "tiny-llama": [["method=prompt", "method.num_virtual_tokens=3"], ["method=p-tuning-v2", "method.num_virtual_tokens=2"],
                   ["method=prompt", "method.num_virtual_tokens=5", "trainer.seed=7"]],
    # masked LM, verbalizer head ([MASK] scores)
    "tiny-bert": [["method=prompt", "method.num_virtual_tokens=4", "task.head=verbalizer"],
                  ["method=prefix", "method.num_virtual_tokens=2", "task.head=verbalizer"]],
}


@pytest.mark.parametrize("model", sorted(MEMBERS))
def test_each_member_equals_ptune_eval_of_that_run_alone(model, tmp_path, data_dir, capsys):
    runs = [make_run(tmp_path / f"run{k}", [f"model={model}", "task=sst2", *o], k) for k, o in enumerate(MEMBERS[model])]
    out = tmp_path / "ens.json"
    assert main(["eval", f"run={','.join(runs)}", "ensemble=vote", f"out={out}"]) == 0
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "ensemble=vote of" in printed and str(out) in printed
    assert result["examples"] == 24 and len(result["members"]) == len(runs)
    labels = result["predictions"]["labels"]
    for k, run in enumerate(runs):
        alone = evaluate_run(run)  # the single-run path: its own backbone, its own batches
        assert result["members"][k]["metrics"] == alone["metrics"]
        records = [json.loads(line) for line in (tmp_path / f"run{k}" / "predictions" / "dev.jsonl").open()]
        assert [labels[p] for p in result["predictions"]["members"][k]] == [r["prediction"] for r in records]
    members = result["predictions"]["members"]
    if len(runs) == 3:  # two classes, three voters: never a tie, the ensemble is the majority
        majority = [Counter(col).most_common(1)[0][0] for col in zip(*members)]
        assert result["predictions"]["ensemble"] == majority
        assert len({tuple(m) for m in members}) > 1  # the members disagree somewhere: the vote is exercised
    gold = result["predictions"]["gold"]
    accuracy = sum(p == g for p, g in zip(result["predictions"]["ensemble"], gold)) / len(gold)
    assert result["ensemble"]["metrics"]["accuracy"] == pytest.approx(accuracy)


def test_mean_writes_beside_the_first_run(tmp_path, data_dir, capsys):
    runs = [make_run(tmp_path / f"run{k}", ["model=tiny-llama", "task=sst2", *o], k)
            for k, o in enumerate(MEMBERS["tiny-llama"][:2])]
    assert main(["eval", f"run={','.join(runs)}", "ensemble=mean", "batch_size=7"]) == 0
    result = json.loads((tmp_path / "run0" / "eval_ensemble_mean_dev.json").read_text())
    assert result["ensemble"]["how"] == "mean" and result["examples"] == 24
    assert "member 2" in capsys.readouterr().out


# -- refusals -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data_dir):
    return make_run(tmp_path_factory.mktemp("ens") / "base", ["model=tiny-llama", "task=sst2", "method=prompt",
                                                              "method.num_virtual_tokens=3"], 0)


@pytest.mark.parametrize("other, extra, message", [
    (["task=rte"], [], "ensemble members must share task: .* has task.name='rte'"),
    (["task=sst2", "task.head=verbalizer"], [], "ensemble members must share task: .* has task.head='verbalizer'"),
    (["task=sst2", "model=tiny-gpt2"], [], "ensemble members must share model: .* has model.name='tiny-gpt2'"),
    (["task=sst2"], ["ensemble=max"], "ensemble='max': choose vote"),
])
def test_runs_that_cannot_be_combined_are_one_line_errors(base_run, tmp_path, other, extra, message, capsys):
    run = make_run(tmp_path / "other", ["model=tiny-llama", "method=prompt", *other], 1)
    args = ["eval", f"run={base_run},{run}", *(extra or ["ensemble=vote"])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    import re

    assert re.search(message, err), err


def test_generation_tasks_and_single_runs_are_refused(tmp_path, base_run, capsys, data_dir):
    gen = [make_run(tmp_path / f"gen{k}", ["model=tiny-llama", "task=e2e", "method=prompt"], k) for k in range(2)]
    assert main(["eval", f"run={','.join(gen)}", "ensemble=vote"]) == 2
    assert "generates text" in capsys.readouterr().err
    assert main(["eval", f"run={base_run}", "ensemble=vote"]) == 2
    assert "at least two runs" in capsys.readouterr().err
    assert main(["eval", f"run={base_run},{base_run}", "ensemble=vote"]) == 2
    assert "names a run twice" in capsys.readouterr().err
