"""`ptune report`: a sweep's table and plots, from a real tiny sweep (tiny-bert, SST-2, linear head)."""

import csv
import json

import pytest

from ptune import cli
from ptune.train import report
from ptune.errors import PtuneError

# 3 lengths x 2 methods; 600 virtual tokens overflow tiny-bert's 512 positions, so those two jobs
# fail inside train() (check_context) and must show as failed rows.
SWEEP = ["-m", "task=sst2", "model=tiny-bert", "method=prompt,p-tuning-v2", "method.num_virtual_tokens=1,4,600",
         "task.max_train_samples=32", "task.max_eval_samples=8", "trainer.batch_size=4", "trainer.max_steps=2",
         "trainer.eval_every=1", "trainer.save_every=2", "trainer.log_every=1", "trainer.lr=1e-2"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    code = cli.main(["train", *SWEEP, f"output_dir={out}"])
    [sweep_dir] = [p for p in out.glob("*/*") if (p / "summary.csv").exists()]
    return code, sweep_dir


def test_sweep_writes_report_table_and_plots(sweep):
    code, sweep_dir = sweep
    assert code == 1  # two jobs failed: the sweep says so, and still reports
    text = (sweep_dir / "report.md").read_text()
    for png in ("report_accuracy.png", "report_train_tokens_per_s.png", "report_peak_memory_mb.png"):
        assert (sweep_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in text  # relative link, so the report can be moved with its folder
    lines = text.splitlines()
    rows = [line for line in lines[lines.index(next(x for x in lines if x.startswith("|---"))) + 1:] if line.startswith("|")]
    assert len(rows) == 6
    header = next(line for line in text.splitlines() if line.startswith("| job |"))
    assert "method.num_virtual_tokens | method |" in header  # x key first, then the line key
    failed = [r for r in rows if "failed:" in r]
    assert len(failed) == 2 and all("| 600 |" in r and "512" in r for r in failed)
    ok = [r for r in rows if r.rstrip().endswith("| ok |")]
    assert sorted(r.split(" | ")[1] for r in ok) == ["1", "1", "4", "4"]
    assert "[report.md](report.md)" in (sweep_dir / "summary.md").read_text()
    assert "`ptune train -m task=sst2 model=tiny-bert method=prompt,p-tuning-v2 method.num_virtual_tokens=1,4,600 " \
           "task.max_train_samples=32" in text  # the command, to run the sweep again


def test_table_values_come_from_each_jobs_summary(sweep):
    _, sweep_dir = sweep
    jobs = report.load_sweep(sweep_dir)
    assert [j.index for j in jobs] == list(range(6))
    for j in jobs:
        if j.error is None:
            s = json.loads((j.run_dir / "summary.json").read_text())
            v = report.job_values(j, "accuracy")
            assert v["metric"] == s["eval"]["accuracy"] and v["train_tokens_per_s"] == s["train_tokens_per_s"]
            assert v["best_step"] in (1, 2)
    assert report.choose_axes(jobs) == ("method.num_virtual_tokens", ["method"])
    lines = report.series(jobs, "method.num_virtual_tokens", ["method"], "accuracy")
    assert {k: [x for x, _ in pts] for k, pts in lines.items()} == {"method=prompt": [1.0, 4.0],
                                                                   "method=p-tuning-v2": [1.0, 4.0]}


def test_report_command_takes_dir_and_links_once(sweep, capsys):
    _, sweep_dir = sweep
    assert cli.main(["report", f"dir={sweep_dir}"]) == 0
    assert cli.main(["report", str(sweep_dir)]) == 0
    assert "report: " in capsys.readouterr().out
    assert (sweep_dir / "summary.md").read_text().count("[report.md](report.md)") == 1


def test_plot_failure_leaves_the_table(sweep, monkeypatch):
    _, sweep_dir = sweep

    def broken(*a, **k):
        raise RuntimeError("no canvas")

    monkeypatch.setattr(report, "plot", broken)
    path, why = report.write_report(sweep_dir)
    assert why == "RuntimeError: no canvas"
    text = path.read_text()
    assert "Plots not drawn: RuntimeError: no canvas." in text and "![" not in text and "| ok |" in text


def test_bad_directories_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(PtuneError, match="does not exist"):
        report.write_report(tmp_path / "nope")
    with pytest.raises(PtuneError, match="holds no summary.csv"):
        report.write_report(tmp_path)
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert cli.main(["report"]) == 2 and "needs one sweep directory" in capsys.readouterr().err


def test_a_sweep_without_finished_jobs_is_an_error(tmp_path):
    with open(tmp_path / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["job", "overrides", "run_dir", "status"])
        w.writeheader()
        w.writerow({"job": 0, "overrides": "trainer.lr=1", "run_dir": "", "status": "failed: boom"})
        w.writerow({"job": 1, "overrides": "trainer.lr=2", "run_dir": str(tmp_path / "1"), "status": "ok"})
    with pytest.raises(PtuneError, match="none of its 2 job"):
        report.write_report(tmp_path)
    jobs = report.load_sweep(tmp_path)
    assert jobs[0].error == "boom" and "no summary.json" in jobs[1].error


def test_axes_and_log_scale():
    def job(i, **o):
        return report.Job(i, {k.replace("_", "."): v for k, v in o.items()}, None)

    # a numeric key is the x axis even when given second; an unchanging key is not "varying"
    jobs = [job(0, method="prompt", trainer_lr="1e-2", task="sst2"), job(1, method="prefix", trainer_lr="1e-4",
                                                                          task="sst2")]
    assert report.choose_axes(jobs) == ("trainer.lr", ["method"])
    assert report.choose_axes([job(0, method="prompt"), job(1, method="prefix")]) == ("method", [])
    assert report.choose_axes([job(0, task="sst2")]) == (None, [])
    assert report.log_scale([1, 10, 100]) and report.log_scale([1e-4, 1e-2])
    assert not report.log_scale([1, 5, 20]) and not report.log_scale([0, 1000]) and not report.log_scale([])


def test_a_sweep_whose_report_cannot_be_made_still_ends(tmp_path, capsys):
    # every job overflows tiny-bert's 512 positions: the sweep ends (exit 1 for the failed jobs) and
    # says in one line why there is no report
    code = cli.main(["train", "-m", "task=sst2", "model=tiny-bert", "method=prompt", "method.num_virtual_tokens=600,700",
                     "task.max_train_samples=8", f"output_dir={tmp_path}"])
    assert code == 1
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("sweep report not written:"))
    assert "none of its 2 job(s) finished" in line
