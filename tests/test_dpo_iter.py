"""dpo.py DPO-Iter (paper Sec. 4.3): sample -> label -> DPO for 2 iterations, with a reward function and with a
reward model; the second iteration's reference is the first iteration's trained policy; a finished run
extended with more --iterations."""

import json
import shutil

import pytest
import torch
from conftest import build_config, build_tokenizer
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import dpo


def iteration_rows(rows):
    return [r for r in rows if "iteration" in r]


def check_reference_chain(out, initial, rows):
    """Iteration 1's reference is the initial policy; iteration 2's is iteration 1's saved policy. Seen
    in the outputs: each iteration's first train row (logging_steps 1: the forward before its first
    update) has every implicit reward exactly 0, which holds only when the reference IS the policy
    being trained; and the last evaluation of iteration 1 is not 0 (it trained), so iteration 2 did
    not reuse the initial policy as its reference. One eval row per step: iteration 2 starts at step 2,
    which iteration 1's final evaluation holds, and adds no baseline evaluation of its own there."""
    info = [json.loads((out / f"iter_{k}" / "iteration.json").read_text()) for k in (1, 2)]
    assert info[0]["reference"] == str(initial) and info[1]["reference"] == str(out / "iter_1")
    evals = [r for r in rows if "eval/rewards/margins" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert evals[0]["eval/rewards/margins"] == 0.0 and evals[1]["eval/rewards/margins"] != 0.0
    firsts = [
        r for r in rows if "train/loss" in r and r["step"] in (1, 3)
    ]  # each iteration's first
    assert len(firsts) == 2
    assert all(r["rewards/margins"] == 0.0 and r["rewards/chosen"] == 0.0 for r in firsts), firsts
    return info


def test_dpo_iter_with_reward_function(
    tiny_model, data_files, run_script, metrics, weights, tmp_path
):
    # Prompts that start with "Q: What" always score 0: their samples tie and are skipped (and counted).
    (tmp_path / "reward.py").write_text(
        "def score(prompts, completions):\n"
        "    return [0.0 if p.startswith('Q: What') else float(len(c)) for p, c in zip(prompts, completions)]\n"
    )
    common = [
        "--model_name_or_path",
        tiny_model,
        "--dataset_name",
        data_files["prompts"],
        "--eval_split",
        "train[:4]",
        "--reward_fn",
        f"{tmp_path / 'reward.py'}:score",
        "--samples_per_prompt",
        3,
        "--max_new_tokens",
        6,
        "--max_steps",
        2,
        "--per_device_train_batch_size",
        2,
        "--learning_rate",
        1e-3,
        "--warmup_ratio",
        0,
        "--logging_steps",
        1,
        "--eval_steps",
        2,
        "--seed",
        4,
    ]
    out = tmp_path / "out"
    proc = run_script("dpo.py", *common, "--iterations", 2, "--output_dir", out)
    rows = metrics(out)
    iters = iteration_rows(rows)
    assert [(r["iteration"], r["step"]) for r in iters] == [(1, 0), (2, 2)]  # global steps continue
    for r in iters:
        assert (
            r["iteration/ties_skipped"] >= 2
            and r["iteration/pairs"] + r["iteration/ties_skipped"] == 8
        )
    assert "skipped (all samples tied)" in proc.stdout
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    info = check_reference_chain(out, tiny_model, rows)
    for k in (1, 2):
        assert (
            0 <= info[k - 1]["unfinished"] <= 1
            and info[k - 1]["unfinished"] == iters[k - 1]["iteration/unfinished"]
        )
        pairs = [
            json.loads(line)
            for line in (out / f"iter_{k}" / "pairs.jsonl").read_text().splitlines()
        ]
        assert len(pairs) == iters[k - 1]["iteration/pairs"]
        for p in pairs:  # best vs worst under this reward
            assert p["chosen_score"] == len(p["chosen"]) > p["rejected_score"] == len(p["rejected"])
    w_final, w_iter2 = weights(out), weights(out / "iter_2")
    assert all(
        torch.equal(w_final[k], w_iter2[k]) for k in w_final
    )  # the final policy is iteration 2's

    # A finished 1-iteration run resumed with --iterations 2 runs iteration 2 only, from (and referenced
    # to) its saved iter_1, its steps and metrics continuing: it ends where the 2-iteration run does.
    extended = tmp_path / "extended"
    run_script("dpo.py", *common, "--iterations", 1, "--output_dir", extended)
    resume = ["--iterations", 2, "--resume_from_checkpoint", "latest"]
    proc = run_script("dpo.py", *common, *resume, "--output_dir", extended)
    assert "resumed after iteration 1 (step 2)" in proc.stdout
    assert proc.stdout.count("iteration 2 train:") == 1 and "iteration 1 train:" not in proc.stdout
    w_extended = weights(extended / "iter_2")
    assert max((w_extended[k] - w_iter2[k]).abs().max().item() for k in w_extended) <= 1e-5
    rows_extended = metrics(extended)
    assert [(r["step"], sorted(r)) for r in rows_extended] == [(r["step"], sorted(r)) for r in rows]
    assert [r["iteration"] for r in iteration_rows(rows_extended)] == [1, 2]
    check_reference_chain(extended, tiny_model, rows_extended)
    assert json.loads((extended / "args.json").read_text())["iterations"] == 2

    def timeless(row):
        return {k: v for k, v in row.items() if not k.endswith("_per_second")}

    second = rows.index(iters[1])  # iteration 2 on: the same values as the uninterrupted run
    for a, b in zip(rows[second:], rows_extended[second:], strict=True):
        assert timeless(b) == pytest.approx(timeless(a), abs=1e-6)


def test_dpo_iter_survives_sigkill_during_an_iteration(
    tiny_model, data_files, run_script, run_killed, metrics, weights, tmp_path
):
    """SIGKILL while iteration 2 samples (iter_1 complete), while it trains (its sampling row and a
    train row logged) and while it saves iter_2, each followed by --resume_from_checkpoint latest:
    each resume starts after iter_1, and the run ends as the uninterrupted one, every row once."""
    (tmp_path / "reward.py").write_text(
        "def score(prompts, completions):\n    return [float(len(c)) for c in completions]\n"
    )
    common = ["--model_name_or_path", tiny_model, "--dataset_name", data_files["prompts"],
              "--eval_split", "train[:4]", "--reward_fn", f"{tmp_path / 'reward.py'}:score",
              "--samples_per_prompt", 2, "--max_new_tokens", 6, "--max_steps", 2,
              "--per_device_train_batch_size", 2, "--learning_rate", 1e-3, "--warmup_ratio", 0,
              "--logging_steps", 1, "--eval_steps", 2, "--iterations", 2]  # fmt: skip
    full, out = tmp_path / "full", tmp_path / "killed"
    run_script("dpo.py", *common, "--output_dir", full)
    args = [*common, "--output_dir", out]
    log = out / "metrics.jsonl"
    run_killed("dpo.py", *args, when=lambda: (out / "iter_1" / "iteration.json").exists())
    assert [r["iteration"] for r in iteration_rows(metrics(out))] == [1]  # killed while sampling
    resume = [*args, "--resume_from_checkpoint", "latest"]
    output = run_killed(
        "dpo.py", *resume, when=lambda: '{"step": 3, "train/loss"' in log.read_text()
    )
    assert "resumed after iteration 1 (step 2)" in output
    output = run_killed("dpo.py", *resume, when=lambda: (out / "iter_2").exists())
    assert "resumed after iteration 1 (step 2)" in output
    proc = run_script("dpo.py", *resume)
    assert "resumed after iteration 1 (step 2)" in proc.stdout
    rows, rows_full = metrics(out), metrics(full)
    assert [(r["step"], sorted(r)) for r in rows] == [(r["step"], sorted(r)) for r in rows_full]
    assert "iter_2 is incomplete (no iteration.json): it runs again" in proc.stdout
    timeless = lambda row: {k: v for k, v in row.items() if not k.endswith("_per_second")}
    for a, b in zip(rows_full, rows, strict=True):
        assert timeless(b) == pytest.approx(timeless(a), abs=1e-5)
    w_full, w = weights(full), weights(out)
    assert max((w[k] - w_full[k]).abs().max().item() for k in w_full) <= 1e-5


def test_dpo_iter_with_reward_model_of_another_tokenizer(
    tiny_model, data_files, run_script, metrics, tmp_path
):
    # A reward model checkpoint as reward_model.py writes it (the contract), with a different vocabulary, so the
    # sampled responses are decoded and re-tokenized with the reward model's tokenizer.
    rm_tok = build_tokenizer(pad=True)
    rm_tok.add_tokens(["<extra>"])
    torch.manual_seed(0)
    config = build_config("gpt2", rm_tok)
    config.num_labels = (
        1  # transformers 5: from_config(config, num_labels=1) is rejected, so set it on the config
    )
    rm = AutoModelForSequenceClassification.from_config(config)
    rm.config.pad_token_id = rm_tok.pad_token_id
    rm.config.reward_mean, rm.config.reward_std = 0.0, 1.0
    rm.save_pretrained(tmp_path / "rm")
    rm_tok.save_pretrained(tmp_path / "rm")
    out = tmp_path / "out"
    proc = run_script(
        "dpo.py",
        "--model_name_or_path",
        tiny_model,
        "--dataset_name",
        data_files["preference_messages"],
        "--eval_split",
        "train[:4]",
        "--iterations",
        2,
        "--reward_model_name_or_path",
        tmp_path / "rm",
        "--samples_per_prompt",
        2,
        "--max_new_tokens",
        6,
        "--max_steps",
        2,
        "--per_device_train_batch_size",
        2,
        "--learning_rate",
        1e-3,
        "--warmup_ratio",
        0,
        "--precompute_ref_logps",
        "--logging_steps",
        1,
        "--output_dir",
        out,
    )
    rows = metrics(out)
    iters = iteration_rows(rows)
    assert [r["iteration"] for r in iters] == [1, 2]
    assert all(
        r["iteration/pairs"] == 8 and r["iteration/ties_skipped"] == 0 for r in iters
    )  # float scores: no ties
    assert all(abs(r["objective/scores"]) > 0 for r in iters)
    assert "iteration 2 train: 8 pairs" in proc.stdout
    check_reference_chain(out, tiny_model, rows)  # precomputed reference log-probs, the same chain
    final, iter2 = (
        AutoModelForCausalLM.from_pretrained(out),
        AutoModelForCausalLM.from_pretrained(out / "iter_2"),
    )
    assert all(
        torch.equal(a, b) for a, b in zip(final.state_dict().values(), iter2.state_dict().values())
    )


def test_gradient_checkpointing_samples_the_same_responses(tiny_model, data_files, tmp_path):
    """DPO-Iter samples in eval mode: with gradient checkpointing on, train mode would drop the KV cache
    during generation. The same seed gives the same pairs with and without it (in-process runs)."""
    (tmp_path / "reward.py").write_text(
        "def score(prompts, completions):\n    return [float(len(c)) for c in completions]\n"
    )
    pairs = []
    for gc in (False, True):
        out = tmp_path / f"gc_{gc}"
        dpo.main(
            dpo.Args(
                model_name_or_path=tiny_model,
                dataset_name=data_files["prompts"],
                train_split="train[:4]",
                reward_fn=f"{tmp_path / 'reward.py'}:score",
                samples_per_prompt=3,
                max_new_tokens=6,
                max_steps=1,
                per_device_train_batch_size=2,
                gradient_checkpointing=gc,
                seed=4,
                output_dir=str(out),
            )
        )
        pairs.append((out / "iter_1" / "pairs.jsonl").read_text())
    assert pairs[0] == pairs[1] and pairs[0]


def test_checkpoint_generation_config_does_not_change_sampling(tiny_model, tmp_path):
    """A policy whose generation_config.json sets repetition_penalty=1.3, no_repeat_ngram_size=2 and
    suppress_tokens samples exactly what the same weights without them sample: DPO-Iter's pairs come
    from the distribution the log-probabilities describe. (On this tiny model's near-uniform logits a
    repetition penalty alone barely changes a draw; suppressed tokens always do.)"""
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    shutil.copytree(tiny_model, tmp_path / "penalized")
    config = json.loads((tmp_path / "penalized" / "generation_config.json").read_text())
    config.pop(
        "_from_model_config", None
    )  # as in hub checkpoints (with it, transformers ignores the file)
    config.update(
        repetition_penalty=1.3, no_repeat_ngram_size=2, suppress_tokens=list(range(5, 300))
    )
    (tmp_path / "penalized" / "generation_config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    args = dpo.Args(samples_per_prompt=3, max_new_tokens=12, top_k=0)
    prompts = [dpo.encode_prompt(tok, "Q: hi\nA:"), dpo.encode_prompt(tok, "Q: What is 2 + 2?\nA:")]
    samples = []
    for path in (tiny_model, str(tmp_path / "penalized")):
        policy = dpo.load_policy(args, path)
        torch.manual_seed(0)
        samples.append(dpo.sample_responses(Accelerator(cpu=True), policy, tok, prompts, args))
        assert policy.generation_config.repetition_penalty in (
            (1.3,) if "penalized" in path else (None, 1.0)
        )
    assert samples[0] == samples[1]
