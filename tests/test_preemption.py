"""Faults a long run meets: a labeller that fails late (a reward function that raises after some
iterations). It ends in one line, keeps the last checkpoint, and the run continues from it with
--resume_from_checkpoint latest once the function is fixed."""

import json
from pathlib import Path

import pytest

import dpo


def steps_logged(out) -> list:
    """The steps of metrics.jsonl's complete lines (the last may be half-flushed while we read)."""
    path = Path(out) / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line)["step"] for line in lines]


def ppo_args(tiny_model, data_files, reward, out):
    """2 prompts x 2 samples per iteration, 4 new tokens: an iteration takes well under a second."""
    return ["--model_name_or_path", tiny_model, "--dataset_name", data_files["prompts"],
            "--reward_fn", reward, "--per_device_prompt_batch_size", 2, "--samples_per_prompt", 2,
            "--num_minibatches", 1, "--per_device_train_batch_size", 4,
            "--local_rollout_forward_batch_size", 4, "--max_new_tokens", 4, "--lr_scheduler", "constant",
            "--warmup_ratio", 0, "--logging_steps", 1, "--output_dir", out]  # fmt: skip


# A labeller that fails late: LABELLER's function scores like `length` until its `calls`-th call of
# the run, from which it raises while a file named "broken" sits beside it. Removing the file between
# the runs fixes it.
LABELLER = """
import pathlib

HERE, CALLS = pathlib.Path(__file__).parent, [0]


def length(prompts, completions):
    CALLS[0] += 1
    if CALLS[0] >= {calls} and (HERE / "broken").exists():
        raise ValueError("labeller down")
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


def test_dpo_iter_labeller_failing_in_iteration_2_resumes_after_iteration_1(
    tiny_model, data_files, run_script, metrics, tmp_path
):
    """The labeller fails in iteration 2 (one error line); iter_1 stays complete, and the resume with
    the fixed function runs iteration 2 only."""
    out = tmp_path / "out"
    args = dpo_iter_args(tiny_model, data_files, labeller(tmp_path, 2, "broken"), out)
    assert_labeller_error(run_script("dpo.py", *args, check=False))
    assert (out / "iter_1" / "iteration.json").exists()
    assert not (out / "iter_2" / "iteration.json").exists()
    (tmp_path / "broken").unlink()
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
