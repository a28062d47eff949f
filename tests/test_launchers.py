"""The suite launches scripts forked from a warm interpreter (tests/warm_launch.py) to skip ~3-10
CPU-seconds of imports per launch. These tests hold that shortcut to the real commands: the same run
through `python script.py`, `accelerate launch --multi_gpu` and `accelerate launch --config_file
deepspeed_zero3.yaml` writes the same weights, metrics and samples as it does forked warm, so every
other test's launch stands for the command a user types."""

import json
import re
import subprocess
import sys

import pytest
import torch
import warm_launch
from conftest import REPO, _env
from test_sft import common_args


def outputs(out, weights):
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in metrics:  # timings are the only values two identical runs may differ in
        for key in [k for k in row if "per_second" in k or k.startswith("time/")]:
            del row[key]
    return weights(out), metrics, (out / "samples.jsonl").read_text()


def same(a, b):
    (wa, ma, sa), (wb, mb, sb) = a, b
    assert wa.keys() == wb.keys()
    assert all((wa[k] == wb[k]).all() for k in wa), "weights differ"
    assert ma == mb
    assert sa == sb


@pytest.mark.parametrize("how", ["python", "ddp", "zero3"])
def test_warm_launch_matches_the_real_command(
    how, tiny_model, data_files, run_script, run_accelerate, run_deepspeed, weights, tmp_path
):
    launch = {"python": run_script, "ddp": run_accelerate, "zero3": run_deepspeed}[how]
    extra = {"stage": 3} if how == "zero3" else {}
    runs = []
    for real in (False, True):
        out = tmp_path / f"real_{real}"
        proc = launch(
            "sft.py",
            *common_args(tiny_model, data_files),
            "--per_device_train_batch_size",
            2,
            "--save_steps",
            0,
            "--output_dir",
            out,
            real_launcher=real,
            **extra,
        )
        # every process prints its data report: the launch really ran that many processes (count
        # the reports, not lines: two processes' prints can land on one line of the shared pipe)
        reports = re.findall(r"train: \d+ examples", proc.stdout)
        assert len(reports) == (1 if how == "python" else 2), proc.stdout
        # and the main process's first line says what runs: processes, device, precision, the global batch
        said = {
            "python": "1 process, device cpu, fp32, global batch 2 examples (2 per device x 1 x 1",
            "ddp": "2 processes (MULTI_CPU), device cpu, fp32, global batch 4 examples (2 per",
            "zero3": "2 processes (DEEPSPEED), device cpu, fp32, global batch 4 examples (2 per",
        }[how]
        # (somewhere, not on the pipe's first line: another process's report may come first, or
        # land on the same line)
        assert said in proc.stdout, proc.stdout[:500]
        runs.append(outputs(out, weights))
    same(*runs)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_forkserver_is_single_threaded():
    """A process forked from a multi-threaded one can deadlock on a lock another thread held (pyarrow's
    jemalloc background thread would be one); the forkserver switches that thread off."""
    threads = warm_launch.forkserver_threads()
    assert len(threads) == 1, f"the forkserver runs threads {threads}"


def test_the_shipped_configs_leave_precision_to_the_scripts_flag():
    """A config that sets mixed_precision: bf16 would train a run without --bf16 in bf16 while its
    args.json records bf16: false."""
    import yaml

    for path in sorted((REPO / "accelerate_configs").glob("*.yaml")):
        assert yaml.safe_load(path.read_text())["mixed_precision"] == "no", path.name


def test_a_launchers_precision_never_overrides_the_flag(
    tiny_model, data_files, run_script, weights, tmp_path, monkeypatch
):
    """What a run trains in is what args.json records: a launcher asking for bf16 (as `accelerate
    launch --mixed_precision bf16` or a config file does, through ACCELERATE_MIXED_PRECISION) without
    --bf16 trains in fp32, the same weights as a plain run, and says so."""
    args = [*common_args(tiny_model, data_files), "--save_steps", 0]
    run_script("sft.py", *args, "--output_dir", tmp_path / "plain")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    proc = run_script("sft.py", *args, "--output_dir", tmp_path / "launcher_bf16")
    assert json.loads((tmp_path / "launcher_bf16" / "args.json").read_text())["bf16"] is False
    wa, wb = weights(tmp_path / "plain"), weights(tmp_path / "launcher_bf16")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "the launcher's bf16 changed the training"
    assert "note: the launcher's mixed_precision bf16 is not used" in proc.stdout, proc.stdout


def test_a_launch_that_starts_fewer_processes_than_asked_says_so(tiny_model, tmp_path):
    """`accelerate launch --cpu --num_processes 2` silently starts one process; it says so (and then
    fails here on purpose at its data, before any model loads, to stay cheap)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += [str(REPO / "sft.py"), "--model_name_or_path", str(tiny_model)]
    cmd += ["--dataset_name", str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path / "o")]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert "1 process, device cpu" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "warning: the launcher asked for 2 processes, but this one runs alone" in proc.stdout


def test_processes_that_each_run_alone_say_so(tiny_model, run_script, tmp_path, monkeypatch):
    """`srun -n 2 python sft.py` starts two processes that each believe they are alone."""
    monkeypatch.setenv("SLURM_NTASKS", "2")
    proc = run_script("sft.py", "--model_name_or_path", tiny_model, "--dataset_name",
                      tmp_path / "missing.jsonl", "--output_dir", tmp_path / "o", check=False)  # fmt: skip
    assert "warning: the launcher asked for 2 processes, but this one runs alone" in proc.stdout
