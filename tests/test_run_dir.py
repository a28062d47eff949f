"""One run per output_dir, and what a resume must share with the run it continues beyond its
arguments (run.json): the training data (edited under the same path) and the process count. Every
script, DPO-Iter included; the refusals run main(Args(...)) in this process, before any model loads."""

import fcntl
import importlib
import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import assert_one_line_error, main_error

REWARD = "def length(prompts, completions):\n    return [float(len(c)) for c in completions]\n"
NAMES = ["sft", "reward_model", "ppo", "dpo", "dpo_iter"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model, data_files):
    """This module's own copies of the data (its tests edit them) and a reward function."""
    d = tmp_path_factory.mktemp("run_dir_data")
    paths = {"model": tiny_model, "rf": str(d / "rf.py")}
    (d / "rf.py").write_text(REWARD)
    for shape in ("prompt_completion", "preference", "prompts"):
        paths[shape] = str(shutil.copy(data_files[shape], d / f"{shape}.jsonl"))
    return paths


def run_args(name: str, f: dict, out) -> tuple:
    """(script, Args keywords) of a tiny run of each stage that leaves a checkpoint to resume from."""
    common = {"model_name_or_path": f["model"], "output_dir": str(out), "logging_steps": 1}
    if name in ("sft", "reward_model", "dpo"):
        data = f["prompt_completion"] if name == "sft" else f["preference"]
        kwargs = dict(dataset_name=data, max_steps=2, per_device_train_batch_size=4, save_steps=1)  # noqa: C408
        return f"{name}.py", {**common, **kwargs}
    if name == "ppo":
        return "ppo.py", dict(common, dataset_name=f["prompts"], reward_fn=f"{f['rf']}:length",
                              per_device_prompt_batch_size=4, samples_per_prompt=1, num_minibatches=1,
                              per_device_train_batch_size=4, local_rollout_forward_batch_size=4,
                              max_new_tokens=4, num_iterations=2, save_steps=1)  # fmt: skip
    return "dpo.py", dict(common, dataset_name=f["prompts"], reward_fn=f"{f['rf']}:length",
                          samples_per_prompt=3, max_new_tokens=4, iterations=1, max_steps=1,
                          per_device_train_batch_size=4)  # fmt: skip


@pytest.fixture(scope="module")
def finished(files, tmp_path_factory):
    """finished(name) -> (script, Args keywords, output_dir) of a finished tiny run, made once."""
    runs = {}

    def get(name):
        if name not in runs:
            out = tmp_path_factory.mktemp(f"done_{name}") / "out"
            script, kwargs = run_args(name, files, out)
            module = importlib.import_module(script[:-3])
            module.main(module.Args(**kwargs))
            runs[name] = (script, kwargs, out)
        return runs[name]

    return get


def resumed_copy(finished, name, tmp_path) -> tuple:
    """A copy of the finished run and the Args keywords that resume it with 'latest'."""
    script, kwargs, out = finished(name)
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    return script, {**kwargs, "output_dir": str(copy), "resume_from_checkpoint": "latest"}, copy


def contents(out: Path) -> dict:
    """Every file of a run directory but the lock (which names the last run that held it)."""
    return {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("name", NAMES)
def test_a_resume_on_training_data_edited_under_the_same_path_is_refused(name, finished, tmp_path):
    """run.json holds a hash of the tokenized training rows: one row edited between the crash and
    the resume (same path, same arguments) is refused in one line, before any model loads; the
    unchanged data resume (the hash is the same from run to run)."""
    script, resume, copy = resumed_copy(finished, name, tmp_path)
    module = importlib.import_module(script[:-3])
    data = Path(resume["dataset_name"])
    original = data.read_text()
    assert "capital of France" in original
    before = contents(copy)
    data.write_text(original.replace("capital of France", "capital of Spain"))
    try:
        message = main_error(script, **resume)
    finally:
        data.write_text(original)
    assert "training data differ" in message and "run.json" in message, message
    assert contents(copy) == before
    module.main(module.Args(**resume))  # the same rows: it resumes (and has nothing left to do)


@pytest.mark.parametrize("name", NAMES)
def test_a_resume_on_another_process_count_is_refused(name, finished, tmp_path):
    """The process count sets the global batch and which rows each step reads: a run recorded on 2
    processes resumed on 1 is refused in one line naming both counts (the real 1 <-> 2 launches:
    test_resume_between_one_and_two_processes_is_refused)."""
    script, resume, copy = resumed_copy(finished, name, tmp_path)
    recorded = copy / "run.json"  # (on 2186397 there is none: the 2 is then ignored)
    run = json.loads(recorded.read_text()) if recorded.exists() else {}
    assert run.get("num_processes", 1) == 1
    recorded.write_text(json.dumps({**run, "num_processes": 2}))
    before = contents(copy)
    message = main_error(script, **resume)
    assert "ran on 2 processes and this one on 1" in message, message
    assert "--num_processes 2" in message
    assert contents(copy) == before


def test_resume_between_one_and_two_processes_is_refused(finished, files, run_accelerate, tmp_path):
    """1 -> 2 processes and back, real launches (on 2186397 both resumed, the global batch silently
    doubled or halved and the epoch counter jumped)."""
    script, resume, _ = resumed_copy(finished, "sft", tmp_path)
    argv = [x for k, v in resume.items() for x in (f"--{k}", v)]
    proc = run_accelerate(script, *argv, check=False)
    errors = {line for line in proc.stderr.splitlines() if line.startswith("error:")}
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1, proc.stderr  # the same line from both processes
    assert "ran on 1 process and this one on 2" in errors.pop()
    two = tmp_path / "two"
    _, kwargs = run_args("sft", files, two)
    kwargs["per_device_train_batch_size"] = 2  # the same global batch as the 1-process run
    run_accelerate(script, *[x for k, v in kwargs.items() for x in (f"--{k}", v)])
    message = main_error(script, **{**kwargs, "resume_from_checkpoint": "latest"})
    assert "ran on 2 processes and this one on 1" in message, message


@pytest.mark.parametrize("name", NAMES)
def test_a_run_on_a_directory_another_run_holds_is_refused_until_that_run_dies(
    name, finished, tmp_path
):
    """A run holds an flock on output_dir/.lock from its main process: a second run on the
    directory is refused in one line, and once the holder dies (SIGKILL: no clean-up of its own)
    the directory resumes at once, nothing stuck."""
    script, resume, copy = resumed_copy(finished, name, tmp_path)
    module = importlib.import_module(script[:-3])
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # another run's main process, holding the directory until it is killed
        try:
            lock = open(copy / ".lock", "w")
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lock.write(f"the run of pid {os.getpid()} on {os.uname().nodename}\n")
            lock.flush()
            os.write(ready_w, b"1")
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(ready_w)  # (a child that fails to take the lock closes the pipe: EOF, not a hang)
    try:
        assert os.read(ready_r, 1) == b"1"
        before = contents(copy)
        message = main_error(script, **resume)
        assert f"{copy} is in use by the run of pid {pid} on" in message, message
        assert contents(copy) == before
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
    module.main(module.Args(**resume))  # the holder crashed: the resume goes ahead


def test_two_runs_started_at_once_on_one_fresh_directory(
    files, run_script, metrics, weights, tmp_path
):
    """Two launches of the same run at the same moment on a fresh output_dir, both with
    --overwrite_output_dir (as a sweep script that always passes it would): one trains, the other is
    refused in one line, and the directory holds one intact run. On 2186397 both trained, the second
    clearing and overwriting the first's outputs as it wrote them."""
    out = tmp_path / "out"
    _, kwargs = run_args("sft", files, out)
    argv = [x for k, v in {**kwargs, "max_steps": 4}.items() for x in (f"--{k}", v)]
    argv.append("--overwrite_output_dir")
    procs = [None, None]

    def launch(i):
        procs[i] = run_script("sft.py", *argv, check=False)

    threads = [threading.Thread(target=launch, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(p.returncode for p in procs)
    assert codes[0] == 0 and codes[1] != 0, [p.stderr[-2000:] for p in procs]
    loser = next(p for p in procs if p.returncode != 0)
    assert_one_line_error(loser, f"{out} is in use by the run of pid")
    assert re.search(r"pid \d+ on ", loser.stderr)
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step_1", "step_2", "step_3"]  # (the last step saves the model only)
    assert all((out / "checkpoints" / c / "step.json").exists() for c in checkpoints)
    assert weights(out).keys() == weights(files["model"]).keys()
