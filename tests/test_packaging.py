"""The package as users install it: pyproject.toml names every package and config group, and a wheel
built from the checkout runs `ptune` from a fresh venv, away from the checkout.

The wheel test is slow (it builds, makes a venv and runs three commands): `.ci/run` runs it with
the other slow tests (`pytest -m slow`). The fresh venv installs the wheel alone (--no-deps) and
borrows its dependencies from the running interpreter's site-packages through a .pth line, which
Python adds to sys.path without processing the .pth files in it: the checkout's editable install
stays invisible, and `ptune` resolves to the wheel's copy (asserted).
"""

import http.client
import json
import os
import signal
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import pytest

from conftest import ROOT


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_lists_every_package_and_every_config_group():
    setup = _pyproject()["tool"]["setuptools"]
    listed = set(setup["packages"])
    packages = {".".join(p.relative_to(ROOT).parts) for p in (ROOT / "ptune").rglob("*")
                if p.is_dir() and (p / "__init__.py").exists()} | {"ptune"}
    groups = {"ptune.conf"} | {f"ptune.conf.{p.name}" for p in (ROOT / "conf").iterdir() if p.is_dir()}
    assert listed == packages | groups, f"pyproject.toml's packages differ: {sorted(listed ^ (packages | groups))}"
    assert setup["package-dir"] == {"ptune.conf": "conf"}
    data = setup["package-data"]
    assert all(data.get(g) == ["*.yaml"] for g in groups), "every config group ships its YAML files"
    # the shipped evaluate modules live in folders without __init__.py, carried as package data
    assert data["ptune.metrics"] == ["modules/*/*.py"] and any((ROOT / "ptune/metrics/modules").glob("*/*.py"))


@pytest.mark.slow
def test_a_wheel_built_from_the_checkout_runs_from_a_fresh_venv(tmp_path, data_dir):
    src, dist = tmp_path / "src", tmp_path / "dist"  # a copy: setuptools' build/ never lands in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "ptune", "conf"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree
                                         else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(src)], check=True, cwd=tmp_path)
    [wheel] = dist.glob("ptune-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "work"  # outside the checkout: no conf/ and no ptune/ beside it
    work.mkdir()
    env = {**os.environ, "PTUNE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}

    def ptune(*args):
        out = subprocess.run([str(env_dir / "bin" / "ptune"), *args], cwd=work, env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    where = subprocess.run([str(py), "-c", "import ptune, ptune.config as c; print(ptune.__file__); print(c.CONF_DIR)"],
                           cwd=work, env=env, check=True, capture_output=True, text=True).stdout.split()
    assert all(Path(w).is_relative_to(env_dir) for w in where), where  # the wheel's code and configs
    assert "method" in ptune("train", "--help") and "prefix" in ptune("train", "--help")
    assert "label-words" in ptune("search", "--help")
    llama = work / "llama-1b"  # Llama-3.2-1B's config.json alone: the plan reads no weights
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=131072, tie_word_embeddings=True)))
    plan = ptune("plan", "model=llama", f"model.name_or_path={llama}", "method=prefix", "trainer.shard=fsdp",
                 "processes=8", "device=cuda", "device_memory=80GiB", "task=e2e", "seq_len=512")
    assert "ptune plan: prefix on llama" in plan and "1,245,288,960 total" in plan and "-> fits in" in plan
    out = ptune("train", "model=tiny-gpt2", "task=e2e", "method=prompt", "task.max_train_samples=16",
                "task.max_eval_samples=2", "task.max_new_tokens=4", "task.metrics=[bleu]", "trainer.batch_size=4",
                "trainer.max_steps=2", "trainer.eval_every=2", "trainer.save_every=2")
    assert "run: " in out
    [run] = (work / "outputs").glob("*/*")
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "summary.json").is_file()
    # the wheel's server (uvicorn, Starlette, prometheus_client) answers /predict, /v1/models, /metrics, then stops
    proc = subprocess.Popen([str(env_dir / "bin" / "ptune"), "serve", f"run=e2e:{run}", "port=0"], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/predict", json.dumps({"inputs": [{"mr": "name[X]"}]}), {"Content-Type": "application/json"})
        answer = conn.getresponse()
        assert answer.status == 200 and "outputs" in json.loads(answer.read())
        conn.request("GET", "/v1/models")
        assert [m["id"] for m in json.loads(conn.getresponse().read())["data"]] == ["e2e"]
        conn.request("GET", "/metrics")
        assert b"ptune_rows_total" in conn.getresponse().read()
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        proc.kill()
