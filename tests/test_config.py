"""Level 1: every config combination composes; registries match the config files; bad values fail clearly."""

import itertools

import pytest

from ptune import methods, tasks
from ptune.config import GROUPS, compose, options
from ptune.train.sweep import expand_sweep
from ptune.config import check
from ptune.errors import PtuneError


def test_registries_match_config_files():
    assert set(methods.METHODS) == set(options("method"))
    assert set(tasks.TASKS) == set(options("task"))


@pytest.mark.parametrize("combo", list(itertools.product(*(options(g) for g in GROUPS))))
def test_every_combination_composes(combo):
    cfg = compose([f"{g}={o}" for g, o in zip(GROUPS, combo)])
    for g, o in zip(GROUPS[:3], combo):
        assert cfg[g].name == o
    check(cfg)  # the shipped defaults are all valid


def test_env_data_dir(monkeypatch):
    monkeypatch.setenv("PTUNE_DATA_DIR", "/some/where")
    assert compose([]).task.data_dir == "/some/where"
    monkeypatch.delenv("PTUNE_DATA_DIR")
    assert compose([]).task.data_dir is None  # -> the hub


def test_defaults_are_the_documented_job():
    cfg = compose([])
    assert (cfg.method.name, cfg.model.name, cfg.task.name) == ("prefix", "smollm2-135m", "e2e")


@pytest.mark.parametrize("override, words", [
    ("method.num_virtual_tokens=0", "method.num_virtual_tokens"),
    ("method.num_virtual_tokens=-3", "integer >= 1"),
    ("trainer.lr=-1", "trainer.lr"),
    ("trainer.precision=fp8", "fp32, bf16, fp16"),
    ("trainer.max_steps=abc", "trainer.max_steps"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("trainer.schedule=exp", "linear, cosine, constant"),
    ("task.max_train_samples=0", "task.max_train_samples"),
])
def test_bad_values(override, words):
    with pytest.raises(PtuneError, match=words.replace(".", r"\.")):
        check(compose([override]))


@pytest.mark.parametrize("override, words", [
    ("method=nope", "unknown method 'nope'; choose one of"),
    ("model=gpt5", "unknown model 'gpt5'"),
    ("task=imagenet", "unknown task 'imagenet'"),
    ("trainer.nope=1", "unknown key 'trainer.nope'"),
    ("method.num_virtual_tokens=1,2", "add -m"),
])
def test_bad_overrides(override, words):
    with pytest.raises(PtuneError) as e:
        compose([override])
    assert words in str(e.value) and "\n" not in str(e.value)


def test_sweep_expansion():
    jobs = expand_sweep(["method.num_virtual_tokens=1,5", "trainer.lr=0.1,0.2", "model=tiny-gpt2"])
    assert len(jobs) == 4
    assert jobs[0] == ["method.num_virtual_tokens=1", "trainer.lr=0.1", "model=tiny-gpt2"]
