"""Checkpoints a user can open and a disk that does not fill: every step_N folder loads with the plain
Auto* class (the weights stored once, not beside a second copy of accelerate's), a resume reads the same
weights back, and --save_total_limit keeps the newest N and still resumes. In process (main(Args(...)),
tiny runs, a checkpoint after every step)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import main_error
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import dpo
import ppo
import reward_model
import sft


def stage_args(stage, tiny_model, data_files, reward_fn, out, steps) -> dict:
    """`steps` optimizer steps (PPO: iterations), a checkpoint after each but the last."""
    if stage == "ppo":
        return dict(  # noqa: C408
            model_name_or_path=tiny_model, dataset_name=data_files["prompts"], output_dir=str(out),
            reward_fn=reward_fn, per_device_prompt_batch_size=2, samples_per_prompt=2,
            num_minibatches=1, per_device_train_batch_size=4, local_rollout_forward_batch_size=4,
            max_new_tokens=4, top_k=0, num_iterations=steps, save_steps=1, learning_rate=1e-3,
        )  # fmt: skip
    data = data_files["prompt_completion" if stage == "sft" else "preference"]
    return dict(  # noqa: C408
        model_name_or_path=tiny_model, dataset_name=data, output_dir=str(out), max_steps=steps,
        per_device_train_batch_size=4, save_steps=1, learning_rate=1e-3,
    )  # fmt: skip


MODULES = {"sft": sft, "reward_model": reward_model, "dpo": dpo, "ppo": ppo}
# the checkpoint's subfolder -> the Auto class that opens it
OPENS = {
    "sft": {"": AutoModelForCausalLM},
    "reward_model": {"": AutoModelForSequenceClassification},
    "dpo": {"": AutoModelForCausalLM},
    "ppo": {"": AutoModelForCausalLM, "critic": AutoModelForSequenceClassification},
}


def state_of(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def steps_of(out: Path) -> list:
    return sorted(int(p.name[5:]) for p in (out / "checkpoints").iterdir())


@pytest.mark.parametrize("stage", list(MODULES))
def test_a_checkpoint_opens_with_from_pretrained_and_resumes_the_same_weights(
    stage, tiny_model, data_files, reward_fn, tmp_path
):
    """--save_total_limit 1 over 3 steps keeps step_2 alone; it opens with the Auto class (and its
    tokenizer), and resuming it with --max_steps 2 (nothing left to train) saves exactly those weights:
    what from_pretrained reads is what the resume reads. The weights are on disk once."""
    module, out = MODULES[stage], tmp_path / "out"
    args = stage_args(stage, tiny_model, data_files, reward_fn, out, 3)
    module.main(module.Args(**args, save_total_limit=1))
    assert steps_of(out) == [2]
    ckpt = out / "checkpoints" / "step_2"
    opened = {sub: cls.from_pretrained(ckpt / sub) for sub, cls in OPENS[stage].items()}
    assert (
        AutoTokenizer.from_pretrained(ckpt).get_vocab()
        == AutoTokenizer.from_pretrained(tiny_model).get_vocab()
    )
    # the step-2 weights differ from the start and from the end (step 3)
    start = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    end = state_of(OPENS[stage][""].from_pretrained(out))
    root = state_of(opened[""])
    shared = [k for k in root if k in start and root[k].shape == start[k].shape]
    assert any(not torch.equal(root[k], start[k]) for k in shared)
    assert any(not torch.equal(root[k], end[k]) for k in root)
    # one copy of the weights: no weights file of accelerate's beside save_pretrained's
    weights = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*.safetensors"))
    expected = ["model.safetensors"] + (["critic/model.safetensors", "reference.safetensors"] if stage == "ppo" else [])  # fmt: skip
    assert weights == sorted(expected), weights
    assert not list(ckpt.glob("*.bin")) or [p.name for p in ckpt.glob("*.bin")] == ["optimizer.bin"]

    args = stage_args(stage, tiny_model, data_files, reward_fn, out, 2)
    module.main(module.Args(**args, resume_from_checkpoint=str(ckpt)))
    final = state_of(OPENS[stage][""].from_pretrained(out))
    assert root.keys() == final.keys()
    assert all(torch.equal(root[k], final[k]) for k in root)
    if stage == "ppo":  # the critic (its value head included); ppo's resume tests check it restores
        assert opened["critic"].config.num_labels == 1


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_save_total_limit_keeps_the_newest_and_still_resumes(
    stage, tiny_model, data_files, reward_fn, tmp_path
):
    """--save_total_limit 2 over 5 steps keeps step_3 and step_4. A copy of that run cut after its
    step-4 checkpoint (its final model deleted, step 5's log row cut) resumes from 'latest' and ends
    on the uninterrupted run's weights, with each step logged once and the limit still held."""
    module = MODULES[stage]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = stage_args(stage, tiny_model, data_files, reward_fn, whole, 5)
    module.main(module.Args(**args, save_total_limit=2))
    assert steps_of(whole) == [3, 4]
    shutil.copytree(whole, cut)
    for p in cut.glob("model*.safetensors"):
        p.unlink()
    rows = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text(
        "".join(r + "\n" for r in rows if json.loads(r)["step"] <= 4)
    )
    args = stage_args(stage, tiny_model, data_files, reward_fn, cut, 5)
    module.main(module.Args(**args, save_total_limit=2, resume_from_checkpoint="latest"))
    assert steps_of(cut) == [3, 4]
    a = state_of(OPENS[stage][""].from_pretrained(whole))
    b = state_of(OPENS[stage][""].from_pretrained(cut))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    train = [r["step"] for r in rows if any(k.startswith(("train/", "objective/")) for k in r)]
    assert sorted(train) == sorted(set(train)) and max(train) == 5, train


def test_save_total_limit_below_one_is_one_line(tiny_model, data_files, reward_fn, tmp_path):
    for stage in ("sft", "reward_model", "dpo", "ppo"):
        args = stage_args(stage, tiny_model, data_files, reward_fn, tmp_path / stage, 2)
        message = main_error(f"{stage}.py", **args, save_total_limit=0)
        assert "--save_total_limit must be >= 1" in message, (stage, message)
        assert not (tmp_path / stage).exists(), stage
