"""dpo.py training: precomputed reference log-probs, learning, 2 processes vs 1, resume."""

import shutil

import pytest
from conftest import save_tiny_model, build_tokenizer, write_jsonl

STATS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
         "logps/rejected"]


def models_held(proc):
    return [int(line.rsplit(":", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("models held during training:")]


@pytest.mark.parametrize("separate_ref", [False, True])
def test_precomputed_reference_matches_live_reference_and_frees_it(separate_ref, tiny_model, data_files, run_script,
                                                                   metrics, weights, tmp_path):
    common = ["--model_name_or_path", tiny_model, "--dataset_name", data_files["preference"], "--eval_split", "train[:5]",
              "--max_steps", 4, "--per_device_train_batch_size", 3, "--per_device_eval_batch_size", 2,
              "--learning_rate", 1e-3, "--logging_steps", 1, "--eval_steps", 2, "--save_steps", 0, "--seed", 2]
    if separate_ref:  # a reference that is not the initial policy: loaded, used once, then deleted
        ref = save_tiny_model("llama", build_tokenizer(pad=True), tmp_path / "ref", seed=1)
        common += ["--ref_model_name_or_path", ref]
    live = run_script("dpo.py", *common, "--output_dir", tmp_path / "live")
    pre = run_script("dpo.py", *common, "--precompute_ref_logps", "--output_dir", tmp_path / "pre")
    # The live run holds policy + reference during training; the precomputed run holds the policy alone.
    assert models_held(live) == [2] and models_held(pre) == [1]
    assert "precomputed reference log-probs of 13 pairs" in pre.stdout
    rows_live, rows_pre = metrics(tmp_path / "live"), metrics(tmp_path / "pre")
    assert len(rows_live) == len(rows_pre) == 4 + 3  # 4 train rows, evals at steps 0, 2, 4
    for a, b in zip(rows_live, rows_pre):
        assert a["step"] == b["step"]
        keys = [k for k in a if k.removeprefix("eval/").removeprefix("train/") in STATS]
        assert len(keys) == 7
        for k in keys:
            assert a[k] == pytest.approx(b[k], abs=1e-5), (a["step"], k)
    if separate_ref:
        assert rows_live[0]["eval/rewards/margins"] != 0  # a different reference gives non-zero rewards at step 0
    w1, w2 = weights(tmp_path / "live"), weights(tmp_path / "pre")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= 1e-5


def test_learns_the_preferred_responses(tiny_model, run_script, metrics, tmp_path):
    # Learnable preference: the chosen response always ends in "yes", the rejected one in "no".
    words = ["red", "blue", "green", "black", "white", "gold", "grey", "pink", "apple", "sky", "grass", "night",
             "snow", "sun", "stone", "rose"]
    rows = [{"prompt": f"Q{i}: {w}?\nA:", "chosen": f" {w} is yes", "rejected": f" {w} is no"}
            for i, w in enumerate(words)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    run_script("dpo.py", "--model_name_or_path", tiny_model, "--dataset_name", data, "--eval_split", "train",
               "--max_steps", 16, "--per_device_train_batch_size", 4, "--learning_rate", 3e-4, "--beta", 0.1,
               "--lr_scheduler", "constant", "--warmup_ratio", 0, "--logging_steps", 4, "--eval_steps", 4,
               "--save_steps", 0, "--precompute_ref_logps", "--output_dir", out)
    evals = [r for r in metrics(out) if "eval/loss" in r]  # eval_split = train: accuracy on the training pairs
    acc, margins = [r["eval/rewards/accuracies"] for r in evals], [r["eval/rewards/margins"] for r in evals]
    print("accuracies", acc, "margins", margins)
    assert evals[0]["step"] == 0 and acc[0] == 0.0 and margins[0] == 0.0  # policy = reference: every margin 0
    assert acc[-1] >= 0.9, acc
    assert all(b > a for a, b in zip(margins, margins[1:])), margins  # the margins grow at every eval


def test_two_processes_match_one_process(tiny_model, data_files, run_script, run_accelerate, weights, tmp_path):
    common = ["--model_name_or_path", tiny_model, "--dataset_name", data_files["preference"], "--max_steps", 4,
              "--learning_rate", 1e-3, "--save_steps", 0, "--logging_steps", 1, "--seed", 3,
              "--per_device_eval_batch_size", 3]
    run_script("dpo.py", *common, "--per_device_train_batch_size", 4, "--output_dir", tmp_path / "one")
    # 2 x 2 pairs per step; the 2-process run also precomputes its reference log-probs, each process a share
    run_accelerate("dpo.py", *common, "--per_device_train_batch_size", 2, "--precompute_ref_logps",
                   "--output_dir", tmp_path / "two")
    w1, w2, w0 = weights(tmp_path / "one"), weights(tmp_path / "two"), weights(tiny_model)
    assert w1.keys() == w2.keys()
    assert max((w1[k] - w0[k]).abs().max().item() for k in w1) > 1e-3  # the runs trained
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert diff <= 1e-4, diff


def test_resume_matches_uninterrupted_run(tiny_model, data_files, run_script, weights, metrics, tmp_path):
    common = ["--model_name_or_path", tiny_model, "--dataset_name", data_files["preference"], "--max_steps", 6,
              "--per_device_train_batch_size", 3, "--learning_rate", 1e-3, "--save_steps", 3, "--logging_steps", 1,
              "--seed", 5]
    full = tmp_path / "full"
    run_script("dpo.py", *common, "--output_dir", full)
    # a run killed after step 3: its last complete checkpoint, plus a half-written one that must be ignored
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    (resumed / "checkpoints" / "step_5.tmp").mkdir()
    proc = run_script("dpo.py", *common, "--output_dir", resumed, "--resume_from_checkpoint", "latest")
    assert "resumed from" in proc.stdout + proc.stderr
    assert [r["step"] for r in metrics(resumed)] == [4, 5, 6]  # 8 pairs, 3 per step: 2 steps per epoch
    w1, w2 = weights(full), weights(resumed)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= 1e-5
    losses = {r["step"]: r for r in metrics(full)}
    for r in metrics(resumed):
        for k in ("train/loss", "rewards/margins", "logps/chosen"):
            assert r[k] == pytest.approx(losses[r["step"]][k], abs=1e-5)
