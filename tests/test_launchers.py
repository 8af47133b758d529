"""`ptune train -m` through Hydra's own launchers and sweepers, hydra.* honoured, experiment trackers
(ptune/train/hydra_app.py, ptune/train/trackers.py, docs/sweeps.md). Tiny models; each test is a
real sweep through `ptune.cli.main` (joblib and submitit start worker processes)."""

import json
from pathlib import Path

import pytest

from ptune.cli import main

JOB = ["model=tiny-llama", "task=sst2", "method=prompt", "task.max_train_samples=16", "task.max_eval_samples=4",
       "trainer.batch_size=4", "trainer.max_steps=2", "trainer.eval_every=2", "trainer.save_every=2",
       "trainer.log_every=1"]


def sweep_dir(root: Path) -> Path:
    [found] = [p for p in root.glob("*/*") if (p / "summary.csv").exists()]
    return found


def jobs(sweep: Path) -> list[dict]:
    return [json.loads(line) for line in (sweep / "jobs.jsonl").read_text().splitlines()]


def summary_rows(sweep: Path) -> list[str]:
    return (sweep / "summary.csv").read_text().splitlines()[1:]


@pytest.mark.slow  # two joblib worker processes
def test_a_joblib_sweep_runs_jobs_in_two_worker_processes(tmp_path, data_dir):
    argv = ["train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *JOB,
            "method.num_virtual_tokens=1,2,3,4", f"output_dir={tmp_path}"]
    assert main(argv) == 0
    sweep = sweep_dir(tmp_path)
    records = jobs(sweep)
    assert sorted(r["job"] for r in records) == [0, 1, 2, 3]
    assert len({r["pid"] for r in records}) == 2  # two worker processes, neither of them this one
    assert len({r["run_dir"] for r in records}) == 4 and all((Path(r["run_dir"]) / "adapter").is_dir() for r in records)
    assert len(summary_rows(sweep)) == 4
    assert (sweep / "report.md").is_file() and json.loads((sweep / "best.json").read_text())["job"] in range(4)


@pytest.mark.slow  # submitit job processes
def test_a_submitit_local_sweep_runs_jobs_as_processes_with_logs_in_the_sweep(tmp_path, data_dir):
    argv = ["train", "-m", "hydra/launcher=submitit_local", *JOB, "method.num_virtual_tokens=1,2",
            f"output_dir={tmp_path}"]
    assert main(argv) == 0
    sweep = sweep_dir(tmp_path)
    assert len(summary_rows(sweep)) == 2
    logs = list((sweep / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2 and any("dev accuracy" in p.read_text() for p in logs)


def test_an_optuna_search_names_its_best_trial(tmp_path, data_dir):
    argv = ["train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=4", "hydra.sweeper.sampler.seed=0",
            "trainer.lr=tag(log, interval(1e-4, 1e-1))", *JOB, "method.num_virtual_tokens=2", f"output_dir={tmp_path}"]
    assert main(argv) == 0
    sweep = sweep_dir(tmp_path)
    records = jobs(sweep)
    assert len(records) == 4 and len({r["overrides"][0] for r in records}) == 4  # four sampled rates
    best = json.loads((sweep / "best.json").read_text())
    assert best["direction"] == "maximize" and best["metric"] == "accuracy"  # from the task, not Optuna's default
    values = [r["summary"]["eval"]["accuracy"] for r in records]
    assert best["value"] == max(values) and Path(best["run_dir"]).is_dir()
    assert f"Best job: {best['job']}" in (sweep / "summary.md").read_text()
    assert "best_params" in (sweep / "optimization_results.yaml").read_text()


def test_an_hparams_search_preset(tmp_path, data_dir):
    argv = ["train", "-m", "hparams_search=prompt_lr", "hydra.sweeper.n_trials=2", *JOB[:2], *JOB[3:],
            f"output_dir={tmp_path}"]
    assert main(argv) == 0
    records = jobs(sweep_dir(tmp_path))
    assert len(records) == 2 and all(r["summary"]["method"] == "prompt" for r in records)


def test_hydra_run_dir_and_sweep_dir_are_obeyed_and_never_reused(tmp_path, data_dir, capsys):
    run = tmp_path / "runs" / "x"
    assert main(["train", *JOB, f"hydra.run.dir={run}"]) == 0
    assert (run / "config.yaml").is_file() and (run / "adapter").is_dir()
    assert main(["train", *JOB, f"hydra.run.dir={run}"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    sweep = tmp_path / "sweeps" / "s"
    assert main(["train", "-m", *JOB, "method.num_virtual_tokens=1,2", f"hydra.sweep.dir={sweep}"]) == 0
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0", "1"]
    assert main(["train", "-m", *JOB, "method.num_virtual_tokens=1,2", f"hydra.sweep.dir={sweep}"]) == 2
    assert "already holds a sweep" in capsys.readouterr().err


def test_cfg_job_prints_the_config_and_writes_nothing(in_tmp, capsys):
    assert main(["train", *JOB, "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "num_virtual_tokens" in out and "max_steps: 2" in out
    assert not any(in_tmp.iterdir())


@pytest.mark.parametrize("argv, words", [
    (["+unknown=1"], "unknown key 'unknown'"),
    (["+trainer.log_with_typo=tensorboard"], "unknown key 'trainer.log_with_typo'"),
    (["-m", "hydra/launcher=nope"], "hydra/launcher/nope"),
    (["-m", "method.num_virtual_tokens=2,0"], "method.num_virtual_tokens=0 is invalid"),  # job 1 bad: none trains
    (["trainer.log_with=neptune"], "trainer.log_with='neptune' is invalid"),
    (["-m", "method.num_virtual_tokens=1,2", "--cfg", "job"], "--cfg prints one job's config"),
    (["hydra.sweep.dir=x", "method.num_virtual_tokens=1,2"], "a comma-separated value is a sweep: add -m"),
])
def test_bad_overrides_are_one_line_before_any_job(in_tmp, capsys, argv, words):
    assert main(["train", *JOB, *argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and words in err[0], err
    assert not list(in_tmp.rglob("config.yaml"))  # no job trained


def test_a_failed_job_is_a_row_and_the_sweep_goes_on(tmp_path, data_dir):
    argv = ["train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *JOB, "model=tiny-bert",
            "method.num_virtual_tokens=2,600", f"output_dir={tmp_path}"]  # 600 overflows tiny-bert's 512 positions
    assert main(argv) == 1
    rows = summary_rows(sweep_dir(tmp_path))
    assert len(rows) == 2 and sum("failed:" in r for r in rows) == 1


def test_a_run_a_sweep_started_resumes(tmp_path, data_dir):
    assert main(["train", "-m", *JOB, "method.num_virtual_tokens=1,2", f"output_dir={tmp_path}"]) == 0
    job = sweep_dir(tmp_path) / "1"
    assert main(["train", f"resume={job}", "trainer.max_steps=3"]) == 0
    assert json.loads((job / "summary.json").read_text())["steps"] == 3


def test_tensorboard_events_hold_the_losses_of_metrics_jsonl(tmp_path, data_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["train", *JOB, "trainer.max_steps=4", "trainer.log_with=tensorboard", f"output_dir={tmp_path}"]) == 0
    run = next(tmp_path.rglob("config.yaml")).parent
    losses = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "loss" in r}
    [events] = [p.parent for p in (run / "tensorboard").rglob("events.out.tfevents.*")
                if not p.parent.name.replace(".", "").isdigit()]
    acc = EventAccumulator(str(events))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("loss")}
    assert logged.keys() == losses.keys() and all(abs(logged[s] - losses[s]) < 1e-6 for s in losses)
    assert "eval/accuracy" in acc.Tags()["scalars"]


def test_an_mlflow_file_store_holds_the_runs_params_and_metrics(tmp_path, data_dir):
    assert main(["train", "-m", *JOB, "method.num_virtual_tokens=1,2", "trainer.log_with=[mlflow]",
                 f"output_dir={tmp_path}"]) == 0
    sweep = sweep_dir(tmp_path)
    store = sweep / "mlruns"
    [experiment] = [p for p in store.iterdir() if p.is_dir() and (p / "meta.yaml").exists() and p.name != "0"]
    runs = [p for p in experiment.iterdir() if p.is_dir() and (p / "params").is_dir()]
    assert len(runs) == 2  # the sweep's two jobs, separate runs of one experiment
    for run in runs:
        assert (run / "params" / "method.num_virtual_tokens").read_text() in ("1", "2")
        assert (run / "params" / "trainer.lr").read_text() == "0.001"
        loss = (run / "metrics" / "loss").read_text().split()
        assert len((run / "metrics" / "loss").read_text().splitlines()) == 2 and float(loss[1]) > 0


def test_a_ray_sweep(tmp_path, data_dir):
    """hydra/launcher=ray on a local Ray, where the optional plugin is installed (docs/sweeps.md)."""
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    pytest.importorskip("ray")
    assert main(["train", "-m", "hydra/launcher=ray", *JOB, "method.num_virtual_tokens=1,2", f"output_dir={tmp_path}"]) == 0
    assert len(summary_rows(sweep_dir(tmp_path))) == 2


def test_tracker_dir_puts_the_tracker_files_there(tmp_path, data_dir):
    elsewhere = tmp_path / "tb"
    assert main(["train", *JOB, "trainer.log_with=tensorboard", f"trainer.tracker_dir={elsewhere}",
                 f"output_dir={tmp_path / 'out'}"]) == 0
    assert list((elsewhere / "tensorboard").rglob("events.out.tfevents.*"))
    assert not list((tmp_path / "out").rglob("events.out.tfevents.*"))
