"""The suite launches scripts forked from a warm interpreter (tests/warm_launch.py) to skip ~3-10
CPU-seconds of imports per launch. These tests hold that shortcut to the real commands: the same run
through `python script.py`, `accelerate launch --multi_gpu` and `accelerate launch --config_file
deepspeed_zero3.yaml` writes the same weights, metrics and samples as it does forked warm, so every
other test's launch stands for the command a user types."""

import json
import sys

import pytest
import warm_launch
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
        # every process prints its data report: the launch really ran that many processes
        reports = [line for line in proc.stdout.splitlines() if line.startswith("train")]
        assert len(reports) == (1 if how == "python" else 2), proc.stdout
        runs.append(outputs(out, weights))
    same(*runs)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_forkserver_is_single_threaded():
    """A process forked from a multi-threaded one can deadlock on a lock another thread held (pyarrow's
    jemalloc background thread would be one); the forkserver switches that thread off."""
    threads = warm_launch.forkserver_threads()
    assert len(threads) == 1, f"the forkserver runs threads {threads}"
