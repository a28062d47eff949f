"""Faults a long run meets: preemption (SIGTERM, as SLURM and Kubernetes send it, and SIGINT) and a
labeller that fails late (a reward function that raises after some iterations). Each ends in one
line, leaves nothing half-written, keeps the last checkpoint, and the run continues from it with
--resume_from_checkpoint latest. The signalled runs are real processes (forked warm, as
run_script's), signalled from outside once their metrics.jsonl shows a step."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import warm_launch
from conftest import REPO, _env, _free_port

import dpo

RESUME_HINT = "continue from the last checkpoint with --resume_from_checkpoint latest"


def steps_logged(out) -> list:
    """The steps of metrics.jsonl's complete lines (the last may be half-flushed while we read)."""
    path = Path(out) / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line)["step"] for line in lines]


def run_and_signal(script, args, out, tmp_path, signum, num_processes=1, after_step=2):
    """Launch `python script args` (num_processes > 1: as `accelerate launch --multi_gpu` on CPU
    does), send `signum` to the first process only once metrics.jsonl shows `after_step`, and wait
    for all. -> (exit codes, their stderr joined, seconds from the signal to the last exit)."""
    files_dir = tmp_path / f"launch_{script}"
    files_dir.mkdir()
    args, env, port = list(map(str, args)), _env(), None
    if num_processes > 1:
        port = _free_port()
        launcher = ["--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
                    "--main_process_port", str(port), "--mixed_precision", "no"]  # fmt: skip
        env = warm_launch.launch_env(launcher, str(REPO / script), env)
    procs, files = warm_launch.start(
        str(REPO / script), args, env, str(REPO), files_dir, num_processes, port
    )
    stderr = lambda: "".join(Path(err).read_text() for _, err in files if Path(err).exists())
    deadline = time.time() + 120
    while not any(s >= after_step for s in steps_logged(out)):
        assert all(p.is_alive() for p in procs), (
            f"{script} ended before step {after_step}: {stderr()}"
        )
        assert time.time() < deadline, f"{script} logged no step {after_step} in 120 s"
        time.sleep(0.02)
    os.kill(procs[0].pid, signum)
    sent = time.time()
    for p in procs:
        p.join(max(sent + 60 - time.time(), 1))
    seconds = time.time() - sent
    for p in procs:  # a hang is a failure, not a stuck test
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs], stderr(), seconds


def assert_stopped_cleanly(codes, stderr, seconds, out):
    """Every process exits 1 within seconds with the one `interrupted:` line, no traceback; no .tmp
    is left; and the newest checkpoint is the step the run stopped at (written on the way out)."""
    assert set(codes) == {1}, (codes, stderr)
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    assert lines == [f"interrupted: {RESUME_HINT}"] * len(codes), stderr
    assert seconds < 20, seconds
    checkpoints = Path(out) / "checkpoints"
    assert not list(checkpoints.glob("*.tmp")), list(checkpoints.iterdir())
    saved = [int(p.name[5:]) for p in checkpoints.glob("step_*")]
    assert saved and max(saved) == max(steps_logged(out)), (saved, steps_logged(out))
    assert (checkpoints / f"step_{max(saved)}" / "step.json").exists()
    return max(saved)


# Tiny runs: constant learning rate, no warm-up, so a resume with a smaller --max_steps trains the
# same steps as a run given that budget from the start.
def sft_args(tiny_model, data_files, out):
    return ["--model_name_or_path", tiny_model, "--dataset_name", data_files["prompt_completion"],
            "--per_device_train_batch_size", 2, "--learning_rate", 1e-3, "--lr_scheduler", "constant",
            "--warmup_ratio", 0, "--logging_steps", 1, "--save_steps", 2, "--output_dir", out]  # fmt: skip


def test_sigterm_stops_sft_at_a_step_end_with_a_checkpoint_and_resumes_to_the_same_weights(
    tiny_model, data_files, run_script, weights, tmp_path
):
    """--save_steps 2: half the steps write a checkpoint, which the signal may land in; one that lands
    on an odd step gets its own. Resumed to 2 more steps, the weights are those of a run given that
    many steps from the start."""
    out = tmp_path / "sigterm"
    args = sft_args(tiny_model, data_files, out)
    codes, stderr, seconds = run_and_signal(
        "sft.py", [*args, "--max_steps", 100000], out, tmp_path, signal.SIGTERM
    )
    k = assert_stopped_cleanly(codes, stderr, seconds, out)
    proc = run_script("sft.py", *args, "--max_steps", k + 2, "--resume_from_checkpoint", "latest")
    assert f"resumed from {out / 'checkpoints' / f'step_{k}'} at step {k}" in proc.stdout
    assert steps_logged(out) == list(range(1, k + 3))
    full = tmp_path / "full"
    run_script("sft.py", *sft_args(tiny_model, data_files, full), "--max_steps", k + 2)
    w_full, w_resumed = weights(full), weights(out)
    assert max((w_full[n] - w_resumed[n]).abs().max().item() for n in w_full) <= 1e-6


def ppo_args(tiny_model, data_files, reward, out):
    """2 prompts x 2 samples per iteration, 4 new tokens: an iteration takes well under a second."""
    return ["--model_name_or_path", tiny_model, "--dataset_name", data_files["prompts"],
            "--reward_fn", reward, "--per_device_prompt_batch_size", 2, "--samples_per_prompt", 2,
            "--num_minibatches", 1, "--per_device_train_batch_size", 4,
            "--local_rollout_forward_batch_size", 4, "--max_new_tokens", 4, "--lr_scheduler", "constant",
            "--warmup_ratio", 0, "--logging_steps", 1, "--output_dir", out]  # fmt: skip


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(
    tiny_model, data_files, tmp_path
):
    """Only the first process is signalled: the flag is reduced across processes at each step's end,
    so the second stops at the same step, after the same checkpoint, instead of waiting for its
    peer in the next collective."""
    out = tmp_path / "out"
    args = [*sft_args(tiny_model, data_files, out), "--max_steps", 100000]
    codes, stderr, seconds = run_and_signal(
        "sft.py", args, out, tmp_path, signal.SIGTERM, num_processes=2
    )
    assert_stopped_cleanly(codes, stderr, seconds, out)


@pytest.mark.parametrize(
    "script,signum",
    [("reward_model.py", signal.SIGINT), ("dpo.py", signal.SIGTERM), ("ppo.py", signal.SIGTERM)],
)
def test_a_signal_stops_at_a_step_end_with_a_checkpoint_and_the_run_continues(
    script, signum, tiny_model, data_files, run_script, tmp_path
):
    """No --save_steps checkpoint is due (1000): the stop writes the only one (PPO's with its EMA'd
    reference), and the resume continues from it to one more step."""
    out = tmp_path / "out"
    if script == "ppo.py":
        (tmp_path / "reward.py").write_text(
            "def length(prompts, completions):\n    return [float(len(c)) for c in completions]\n"
        )
        args = ppo_args(tiny_model, data_files, f"{tmp_path / 'reward.py'}:length", out)
        budget = "--num_iterations"
    else:
        args = ["--model_name_or_path", tiny_model, "--dataset_name", data_files["preference"],
                "--per_device_train_batch_size", 2, "--lr_scheduler", "constant",
                "--warmup_ratio", 0, "--logging_steps", 1, "--output_dir", out]  # fmt: skip
        budget = "--max_steps"
    args += ["--save_steps", 1000]
    codes, stderr, seconds = run_and_signal(script, [*args, budget, 100000], out, tmp_path, signum)
    k = assert_stopped_cleanly(codes, stderr, seconds, out)
    if script == "ppo.py":
        assert (out / "checkpoints" / f"step_{k}" / "reference.safetensors").exists()
    run_script(script, *args, budget, k + 1, "--resume_from_checkpoint", "latest")
    assert steps_logged(out) == list(range(1, k + 2))
    assert (out / "model.safetensors").exists()


def test_a_second_signal_stops_at_once_unless_it_is_a_launchers_forwarded_copy():
    stop = dpo.StopSignal()
    with pytest.raises(KeyboardInterrupt):  # no loop running: at once
        stop.handle(signal.SIGTERM, None)
    stop.deferred = True
    stop.handle(signal.SIGTERM, None)  # recorded, for the loop's next requested()
    stop.handle(signal.SIGTERM, None)  # torchrun's copy of it, a moment later: the same signal
    stop.first -= 2  # a second signal two seconds on
    with pytest.raises(KeyboardInterrupt):
        stop.handle(signal.SIGINT, None)


# A labeller that fails late: LABELLER's function scores like `length` until its `calls`-th call of
# the run, from which it raises while a file named "broken" sits beside it (or, with "signal"
# there, sends its own process SIGTERM, as a scheduler would, during that call). Removing the file
# between the runs fixes it.
LABELLER = """
import os, pathlib, signal

HERE, CALLS = pathlib.Path(__file__).parent, [0]


def length(prompts, completions):
    CALLS[0] += 1
    if CALLS[0] >= {calls} and (HERE / "broken").exists():
        raise ValueError("labeller down")
    if CALLS[0] == {calls} and (HERE / "signal").exists():
        os.kill(os.getpid(), signal.SIGTERM)
    return [float(len(c)) for c in completions]
"""


def labeller(tmp_path, calls: int, fault: str) -> str:
    (tmp_path / "reward.py").write_text(LABELLER.format(calls=calls))
    (tmp_path / fault).touch()
    return f"{tmp_path / 'reward.py'}:length"


def assert_labeller_error(proc):
    """One `error:` line with the function's own error and where it was raised; no traceback."""
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert "--reward_fn raised ValueError at reward.py:10 (labeller down)" in errors[0], errors[0]
    assert "the last checkpoint is kept" in errors[0], errors[0]


def test_ppo_labeller_failing_at_iteration_3_keeps_step_2_and_the_fixed_run_resumes(
    tiny_model, data_files, run_script, weights, tmp_path
):
    """Checkpoints every iteration; the function raises in iteration 3's rollout. Fixed and resumed,
    the run ends at the weights of an uninterrupted run with the fixed function."""
    out, reward = tmp_path / "out", labeller(tmp_path, 3, "broken")
    args = ppo_args(tiny_model, data_files, reward, out)
    args += ["--num_iterations", 4, "--save_steps", 1]
    assert_labeller_error(run_script("ppo.py", *args, check=False))
    assert steps_logged(out) == [1, 2]
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step_1", "step_2"]
    assert not (out / "model.safetensors").exists()
    (tmp_path / "broken").unlink()
    run_script("ppo.py", *args, "--resume_from_checkpoint", "latest")
    assert steps_logged(out) == [1, 2, 3, 4]
    full = tmp_path / "full"
    run_script("ppo.py", *ppo_args(tiny_model, data_files, reward, full), "--num_iterations", 4)
    w_full, w_resumed = weights(full), weights(out)
    assert max((w_full[n] - w_resumed[n]).abs().max().item() for n in w_full) <= 1e-6


def dpo_iter_args(tiny_model, data_files, reward, out):
    return ["--model_name_or_path", tiny_model, "--dataset_name", data_files["prompts"],
            "--reward_fn", reward, "--iterations", 2, "--samples_per_prompt", 2, "--max_new_tokens", 4,
            "--max_steps", 2, "--per_device_train_batch_size", 2, "--logging_steps", 1,
            "--output_dir", out]  # fmt: skip


@pytest.mark.parametrize("fault", ["broken", "signal"])
def test_dpo_iter_stopped_in_iteration_2s_labelling_resumes_after_iteration_1(
    fault, tiny_model, data_files, run_script, metrics, tmp_path
):
    """The labeller fails (one error line), or the process gets SIGTERM while it labels iteration
    2's samples (the interrupted line at once); iter_1 stays complete, and the resume with the fixed
    function runs iteration 2 only."""
    out = tmp_path / "out"
    args = dpo_iter_args(tiny_model, data_files, labeller(tmp_path, 2, fault), out)
    proc = run_script("dpo.py", *args, check=False)
    if fault == "broken":
        assert_labeller_error(proc)
    else:
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.startswith("interrupted:")]
        assert lines == [f"interrupted: {RESUME_HINT}"], proc.stderr
    assert (out / "iter_1" / "iteration.json").exists()
    assert not (out / "iter_2" / "iteration.json").exists()
    (tmp_path / fault).unlink()
    proc = run_script("dpo.py", *args, "--resume_from_checkpoint", "latest")
    assert "resumed after iteration 1 (step 2)" in proc.stdout
    rows = metrics(out)
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    assert [(r["iteration"], r["step"]) for r in rows if "iteration" in r] == [(1, 0), (2, 2)]
    assert (out / "iter_2" / "iteration.json").exists() and (out / "model.safetensors").exists()


def test_a_labeller_that_fails_on_one_process_stops_every_process_with_its_error(
    tiny_model, data_files, run_accelerate, tmp_path
):
    """PPO on 2 processes, the function raising on the second only: both stop at once with its
    error (no process is left waiting in the next collective, no traceback)."""
    (tmp_path / "reward.py").write_text(
        "import os\n\n\ndef length(prompts, completions):\n"
        "    if os.environ['RANK'] == '1':\n        raise ValueError('labeller down')\n"
        "    return [float(len(c)) for c in completions]\n"
    )
    out = tmp_path / "out"
    args = ppo_args(tiny_model, data_files, f"{tmp_path / 'reward.py'}:length", out)
    proc = run_accelerate("ppo.py", *args, "--num_iterations", 1, check=False, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and len(set(errors)) == 1, proc.stderr
    assert "--reward_fn raised ValueError at reward.py:6 (labeller down)" in errors[0]


def test_call_reward_fn_reports_a_raise_or_a_nan_in_one_line():
    def broken(prompts, completions):
        return {}["missing"]

    with pytest.raises(dpo.DataError) as info:
        dpo.call_reward_fn(broken, ["p"], ["c"], [True])
    message = str(info.value)
    assert message.startswith("--reward_fn raised KeyError at test_preemption.py:")
    assert "('missing')" in message and "the last checkpoint is kept" in message
    with pytest.raises(
        dpo.DataError, match="non-finite score .nan. for 1 of 2.*checkpoint is kept"
    ):
        dpo.call_reward_fn(lambda p, c: [1.0, float("nan")], ["a", "b"], ["x", "y"], [True, True])

    # KeyboardInterrupt (a signal) is not the function's error: it passes through
    def interrupted(prompts, completions):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dpo.call_reward_fn(interrupted, ["p"], ["c"], [True])
