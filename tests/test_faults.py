"""Faults a long run meets besides bad input: a disk that fills during a save, a checkpoint damaged
after it was written, a log line cut short by a kill. In process (main(Args(...)), injected write
failures, tiny runs); the SIGKILL tests run real processes, in test_ppo.py and test_dpo_iter.py."""

import errno
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import main_error

import dpo
import ppo


def ppo_args(tiny_model, data_files, reward_fn, out, **extra) -> dict:
    """3 iterations of 2 prompts x 2 samples, a checkpoint after each but the last (step_1, step_2)."""
    return dict(  # noqa: C408
        model_name_or_path=tiny_model, dataset_name=data_files["prompts"], output_dir=str(out),
        reward_fn=reward_fn, per_device_prompt_batch_size=2, samples_per_prompt=2,
        num_minibatches=1, per_device_train_batch_size=4, local_rollout_forward_batch_size=4,
        max_new_tokens=4, top_k=0, num_iterations=3, save_steps=1, learning_rate=1e-3,
    ) | extra  # fmt: skip


def sft_args(tiny_model, data_files, out, **extra) -> dict:
    return dict(  # noqa: C408
        model_name_or_path=tiny_model, dataset_name=data_files["prompt_completion"],
        output_dir=str(out), max_steps=2, per_device_train_batch_size=4, save_steps=1,
    ) | extra  # fmt: skip


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def files_of(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- a log line cut short by a kill ----


def test_resume_drops_a_log_line_cut_short_by_a_kill(tmp_path):
    """A run killed while appending to metrics.jsonl leaves half a line: the resume drops it with the
    rows after its checkpoint, and DPO-Iter's resume also the sampling row of the iteration it
    re-runs (logged at the step where the previous iteration ended)."""
    rows = [{"step": 1, "a": 1.0}, {"step": 2, "iteration": 2, "b": 1.0}, {"step": 3, "a": 3.0}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "a": 0.'
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    ppo.MetricsLog(
        SimpleNamespace(is_main_process=True, log=lambda *a, **k: None), tmp_path, resume_step=2
    )
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:2]
    path.write_text(text)
    dpo.keep_rows_up_to(path, 2, iteration=1)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:1]


# ---- a full disk ----


def test_full_disk_while_logging_is_one_line(tmp_path):
    log = ppo.MetricsLog(SimpleNamespace(is_main_process=True, log=lambda *a, **k: None), tmp_path)
    log.file = SimpleNamespace(name=log.file.name, write=no_space, flush=lambda: None)
    with pytest.raises(ppo.DataError, match="cannot write .*metrics.jsonl .*No space left"):
        log.log({"train/loss": 1.0}, 1)


def test_full_disk_during_a_checkpoint_keeps_the_last_complete_one(
    tiny_model, data_files, reward_fn, tmp_path, monkeypatch
):
    """The disk fills while PPO writes checkpoint step_2 (its EMA'd reference, the last file): one
    line, step_2 removed, 'latest' is step_1, reference included, and the run resumes from it."""
    real_save_file, calls = ppo.save_file, []

    def fill_at_second_reference(tensors, path):
        calls.append(path)
        if len(calls) < 2:
            return real_save_file(tensors, path)
        Path(path).write_bytes(b"partial")
        no_space()

    monkeypatch.setattr(ppo, "save_file", fill_at_second_reference)
    out = tmp_path / "out"
    args = ppo_args(tiny_model, data_files, reward_fn, out)
    message = main_error("ppo.py", **args)
    assert "cannot write checkpoint" in message and "step_2" in message, message
    assert "No space left on device" in message and "MiB free" in message, message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1"]
    latest = ppo.find_checkpoint(SimpleNamespace(print=print), out, "latest")
    assert latest == out / "checkpoints" / "step_1"
    assert (latest / "reference.safetensors").exists()
    monkeypatch.setattr(ppo, "save_file", real_save_file)  # space freed
    ppo.main(ppo.Args(**args, resume_from_checkpoint="latest"))
    assert (out / "model.safetensors").exists()


def test_full_disk_in_torch_save_and_in_the_final_save(
    tiny_model, data_files, tmp_path, monkeypatch
):
    """torch.save on a full disk fails with its own RuntimeError ('enforce fail at
    inline_container.cc'), leaving a partial file: one line, the partial step_2 removed. A final save
    that fails after the weights were written (in the tokenizer's files) leaves no weights in
    output_dir, so nothing there loads as if it were a complete model."""
    real_torch_save = torch.save

    def torch_save_fills_disk(obj, f, *args, **kwargs):
        if "step_2" in str(f):
            Path(f).write_bytes(b"PK\x03\x04partial")
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
            )
        return real_torch_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", torch_save_fills_disk)
    out = tmp_path / "ckpt"
    message = main_error("sft.py", **sft_args(tiny_model, data_files, out, max_steps=3))
    assert "cannot write checkpoint" in message and "inline_container" in message, message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1"]
    monkeypatch.setattr(torch, "save", real_torch_save)

    from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", no_space)
    out = tmp_path / "final"
    message = main_error("sft.py", **sft_args(tiny_model, data_files, out, save_steps=0))
    assert "cannot save the model in" in message and "No space left" in message, message
    assert not list(out.glob("*.safetensors*")) and not (out / "model.tmp").exists()
    with pytest.raises((OSError, ValueError)):  # no config.json, no weights
        AutoModelForCausalLM.from_pretrained(out)


# ---- a damaged checkpoint ----


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {  # how step_2 is damaged -> what the one error line says (None: falls back to step_1)
    "truncated weights": (lambda c: truncate(c / "model.safetensors"), "model and optimizer"),
    "truncated reference": (
        lambda c: truncate(c / "reference.safetensors"),
        "reference.safetensors",
    ),
    "garbage optimizer": (lambda c: (c / "optimizer.bin").write_bytes(b"garbage"), "optimizer"),
    "garbage RNG state": (
        lambda c: (c / "random_states_0.pkl").write_bytes(b"\0"),
        "random_states_0",
    ),
    "garbage step.json": (lambda c: (c / "step.json").write_text("{not json"), "JSONDecodeError"),
    "step.json lacks an entry": (
        lambda c: (c / "step.json").write_text('{"step": 2}'),
        "'scheduler'",
    ),
    "no step.json": (lambda c: (c / "step.json").unlink(), None),
}


@pytest.fixture(scope="module")
def ppo_run(tiny_model, data_files, reward_fn, tmp_path_factory):
    """A finished 3-iteration PPO run with checkpoints step_1 and step_2."""
    out = tmp_path_factory.mktemp("ppo_run") / "run"
    ppo.main(ppo.Args(**ppo_args(tiny_model, data_files, reward_fn, out)))
    return out


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_checkpoint_is_refused_in_one_line_or_skipped_with_a_warning(
    damage, ppo_run, tiny_model, data_files, reward_fn, tmp_path, capsys
):
    """The newest checkpoint damaged, resumed with 'latest': one line naming step_2 and what is
    wrong, the checkpoints and metrics unchanged; or, with no step.json (deleted), a warning and a
    resume from step_1. Never a traceback from torch or safetensors, never a silent start from
    another state (accelerate skips an unreadable RNG state without a word)."""
    out = tmp_path / "run"
    shutil.copytree(ppo_run, out)
    how, needle = DAMAGE[damage]
    how(out / "checkpoints" / "step_2")
    args = ppo_args(tiny_model, data_files, reward_fn, out, resume_from_checkpoint="latest")
    if needle is None:
        capsys.readouterr()
        ppo.main(ppo.Args(**args))
        printed = capsys.readouterr().out
        assert f"warning: skipping {out / 'checkpoints' / 'step_2'}: no step.json" in printed
        assert f"resumed from {out / 'checkpoints' / 'step_1'} at step 1" in printed
        return
    before = files_of(out / "checkpoints"), (out / "metrics.jsonl").read_text()
    message = main_error("ppo.py", **args)
    assert str(out / "checkpoints" / "step_2") in message and needle in message, message
    assert (files_of(out / "checkpoints"), (out / "metrics.jsonl").read_text()) == before


def test_damaged_dpo_resume_points_are_one_line(tiny_model, data_files, reward_fn, tmp_path):
    """DPO reads step.json before the models load; DPO-Iter reads iter_K/iteration.json and then
    iter_K's policy: garbage in either, or a truncated policy, is one line naming it."""
    out = tmp_path / "dpo"
    (out / "checkpoints" / "step_1").mkdir(parents=True)
    (out / "checkpoints" / "step_1" / "step.json").write_text("{not json")
    common = dict(model_name_or_path=tiny_model, max_steps=1, per_device_train_batch_size=2,  # noqa: C408
                  resume_from_checkpoint="latest")  # fmt: skip
    message = main_error(
        "dpo.py", dataset_name=data_files["preference"], output_dir=str(out), **common
    )
    assert "step_1: cannot resume from this checkpoint (step.json: JSONDecodeError" in message

    online = dict(common, dataset_name=data_files["prompts"], reward_fn=reward_fn, iterations=2)
    out = tmp_path / "dpo_iter"
    shutil.copytree(tiny_model, out / "iter_1")
    (out / "iter_1" / "iteration.json").write_text("garbage")
    message = main_error("dpo.py", output_dir=str(out), **online)
    assert "iter_1: cannot resume after it (iteration.json: JSONDecodeError" in message
    (out / "iter_1" / "iteration.json").write_text(json.dumps({"iteration": 1, "step": 1}))
    truncate(out / "iter_1" / "model.safetensors")
    message = main_error("dpo.py", output_dir=str(out), **online)
    assert "iter_1" in message and "SafetensorError" in message, message
