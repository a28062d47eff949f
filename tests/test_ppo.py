"""End-to-end and integration tests of ppo.py: learning, the key-factor switches, 2 processes, resume,
bad input. Runs are tiny (8 prompts, 16 new tokens) so the file stays well under a minute or two."""

import json
import math
import shutil
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, _QA, build_config, build_tokenizer, write_jsonl

import ppo

# The six names of DESIGN section 6 that every iteration logs, plus our timing and memory.
TRAIN_METRICS = ["objective/scores", "objective/kl", "objective/entropy", "objective/non_score_reward",
                 "objective/rlhf_reward", "policy/approxkl", "policy/clipfrac", "loss/policy", "loss/value",
                 "val/clipfrac", "val/explained_variance", "val/num_eos_tokens", "episode", "lr", "eps",
                 "time/rollout_seconds", "time/update_seconds", "memory/peak_gb"]

REWARD_FN = '''
def count_bang(prompts, completions):
    """The number of '!' in the response: a reward the tiny random policy can learn quickly."""
    return [float(c.count("!")) for c in completions]


def wrong_length(prompts, completions):
    return [1.0] * (len(completions) + 1)
'''


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("reward") / "rewards.py"
    path.write_text(REWARD_FN)
    return str(path)


def small_run(policy, prompts, out, *extra):
    """8 prompts x 4 samples = 32 rollouts per iteration in 2 minibatches of 16, no top-k."""
    return ["--model_name_or_path", policy, "--dataset_name", prompts, "--output_dir", out,
            "--per_device_prompt_batch_size", 8, "--samples_per_prompt", 4, "--num_minibatches", 2,
            "--per_device_train_batch_size", 16, "--local_rollout_forward_batch_size", 32, "--max_new_tokens", 16,
            "--top_k", 0, *extra]


def save_reward_model(tokenizer, path, arch="llama", seed=0, mean=0.0, std=1.0):
    """A reward_model.py-shaped checkpoint built from config (the contract), with its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = build_config(arch, tokenizer)
    config.num_labels = 1  # transformers 5: from_config(config, num_labels=1) is refused, so set it on the config
    model = AutoModelForSequenceClassification.from_config(config)
    model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.config.reward_mean, model.config.reward_std = mean, std
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def build_other_tokenizer():
    """A byte-level BPE with a different vocabulary (smaller, other specials order) than the fixture's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Q: what is the answer? A: it is!"] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


# ---- learning ----


def test_learns_with_a_reward_function(tiny_model, data_files, reward_file, run_script, metrics, tmp_path):
    out = tmp_path / "run"
    run_script("ppo.py", *small_run(tiny_model, data_files["prompts"], out, "--reward_fn", f"{reward_file}:count_bang",
                                    "--num_iterations", 20, "--learning_rate", 3e-3, "--critic_learning_rate", 3e-3,
                                    "--lr_scheduler", "constant", "--eval_split", "train[:4]", "--eval_steps", 10,
                                    "--save_steps", 10))
    rows = metrics(out)
    train = [r for r in rows if "objective/scores" in r]
    assert [r["step"] for r in train] == list(range(1, 21))
    for name in TRAIN_METRICS:
        assert all(math.isfinite(r[name]) for r in train), name
    scores = [r["objective/scores"] for r in train]
    first, last = statistics.fmean(scores[:3]), statistics.fmean(scores[-3:])
    print(f"mean '!' count per response: first 3 iterations {first:.3f}, last 3 iterations {last:.3f}")
    assert last > first + 1.0 and last > 3 * first, (first, last)
    kls = [r["objective/kl"] for r in train]
    assert train[0]["objective/kl"] == 0.0  # the reference starts as an exact copy of the policy
    assert statistics.fmean(kls) >= 0
    assert [r["episode"] for r in train] == [32 * s for s in range(1, 21)]  # rollout batch = 8 prompts x 4 samples
    # eval, best checkpoint, samples, a loadable policy
    evals = [r for r in rows if "eval/score" in r]
    assert [r["step"] for r in evals] == [10, 20] and all(math.isfinite(r["eval/kl"]) for r in evals)
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["eval/score"] == max(r["eval/score"] for r in evals)
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert {s["step"] for s in samples} == {10, 20} and all({"prompt", "completion", "score"} <= set(s) for s in samples)
    from transformers import AutoModelForCausalLM

    for d in (out, out / "best"):
        AutoModelForCausalLM.from_pretrained(d)
    # key factor 3: with the default ref_ema the checkpointed reference has moved away from the SFT policy
    assert not reference_equals_sft(out / "checkpoints" / "step_10", tiny_model)


def reference_equals_sft(checkpoint: Path, sft_dir) -> bool:
    """The EMA'd reference is registered for checkpointing (4th custom object: scheduler, value stats, KL, ref)."""
    from conftest import load_weights

    ref = torch.load(checkpoint / "custom_checkpoint_3.pkl", weights_only=True)
    sft = load_weights(sft_dir)
    return all(torch.equal(ref[k], sft[k]) for k in sft)


def test_reward_model_path_and_baseline_switches(tiny_model, tokenizer_dir, data_files, run_script, metrics, tmp_path):
    """A from-config reward model (the contract shape), with Table 3's 'baseline PPO' switches:
    no advantage whitening, ref_ema 0 (the reference stays the SFT model), small batch."""
    from transformers import AutoTokenizer

    rm = save_reward_model(AutoTokenizer.from_pretrained(tokenizer_dir), tmp_path / "rm", mean=0.5, std=2.0)
    out = tmp_path / "run"
    run_script("ppo.py", *small_run(tiny_model, data_files["prompts"], out, "--reward_model_name_or_path", rm,
                                    "--normalize_reward", "--num_iterations", 2, "--save_steps", 1,
                                    "--no-whiten_advantages", "--ref_ema", 0, "--missing_eos_penalty", -10.0,
                                    "--num_minibatches", 1, "--temperature", 0.7))
    train = [r for r in metrics(out) if "objective/scores" in r]
    assert len(train) == 2 and all(math.isfinite(r[k]) for r in train for k in TRAIN_METRICS)
    # One minibatch: the update's first forward sees exactly the rollout policy, so the rollout log-probs
    # (chunked, no_grad, at the sampling temperature) must equal the training forward's: ratio 1.
    assert all(r["policy/approxkl"] < 1e-9 and r["policy/clipfrac"] == 0 for r in train)
    args = json.loads((out / "args.json").read_text())
    assert args["whiten_advantages"] is False and args["ref_ema"] == 0.0
    assert reference_equals_sft(out / "checkpoints" / "step_1", tiny_model)  # ref_ema = 0: untouched


def test_scorer_reads_the_reward_at_the_last_token_normalized_and_retokenized(tokenizer_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rm_dir = save_reward_model(tok, tmp_path / "rm", mean=1.5, std=4.0)
    rm = ppo.freeze(AutoModelForSequenceClassification.from_pretrained(rm_dir))
    prompts = [tok("Q: hi\nA:").input_ids, tok("Q: What is 2 + 2?\nA:").input_ids]
    batch = ppo.collate_prompts(prompts, tok.pad_token_id)
    first = tok(" yes!").input_ids + [tok.eos_token_id, tok.pad_token_id]  # ends in EOS, then padding
    second = tok(" It is 4, or so they say, but ok").input_ids[: len(first)]  # no EOS: truncated
    responses = torch.tensor([first, second])
    responses, mask, has_eos = ppo.truncate_after_eos(responses, tok.eos_token_id, tok.pad_token_id)
    args = SimpleNamespace(normalize_reward=True, reward_fn=None)
    scorer = ppo.Scorer(args, tok, torch.device("cpu"), rm)
    scores = scorer(batch["input_ids"], batch["attention_mask"], responses, mask, has_eos)
    with torch.no_grad():
        for b in range(2):  # score the unpadded sequence on its own: the head at its final token
            ids = prompts[b] + responses[b][mask[b].bool()].tolist()
            raw = ppo.score_tokens(rm, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0, -1].item()
            assert scores[b].item() == pytest.approx((raw - 1.5) / 4.0, abs=1e-4)
    # a reward model with another vocabulary: the text is re-tokenized with its tokenizer
    other = build_other_tokenizer()
    assert not ppo.same_vocab(other, tok) and ppo.same_vocab(tok, AutoTokenizer.from_pretrained(tokenizer_dir))
    other_rm = ppo.freeze(AutoModelForSequenceClassification.from_pretrained(
        save_reward_model(other, tmp_path / "rm_other")))
    scorer = ppo.Scorer(SimpleNamespace(normalize_reward=False, reward_fn=None), tok, torch.device("cpu"), other_rm, other)
    scores = scorer(batch["input_ids"], batch["attention_mask"], responses, mask, has_eos)
    with torch.no_grad():
        for b, (prompt, completion) in enumerate([("Q: hi\nA:", " yes!"), ("Q: What is 2 + 2?\nA:", None)]):
            completion = completion or tok.decode(responses[1].tolist())
            ids = other(prompt).input_ids + other(completion, add_special_tokens=False).input_ids
            ids += [other.eos_token_id] if has_eos[b] else []
            raw = ppo.score_tokens(other_rm, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0, -1].item()
            assert scores[b].item() == pytest.approx(raw, abs=1e-4)


def test_reward_model_with_a_different_tokenizer_is_retokenized(tiny_model, data_files, run_script, metrics, tmp_path):
    rm = save_reward_model(build_other_tokenizer(), tmp_path / "rm_other")
    out = tmp_path / "run"
    proc = run_script("ppo.py", *small_run(tiny_model, data_files["prompts"], out, "--reward_model_name_or_path", rm,
                                           "--value_model_name_or_path", tiny_model, "--num_iterations", 1))
    assert "re-tokenized" in proc.stdout
    assert math.isfinite(metrics(out)[0]["objective/scores"])


@pytest.mark.skipif(not (REPO / "reward_model.py").exists(), reason="reward_model.py is not in the repo yet")
def test_learns_with_a_trained_reward_model(tiny_model, reward_file, run_script, metrics, tmp_path):
    """reward_model.py learns 'more ! is better' from preference pairs; PPO then raises that reward."""
    pref = write_jsonl(tmp_path / "pref.jsonl",
                       [{"prompt": f"Q: {q}\nA:", "chosen": f" {a} !!!!", "rejected": f" {a}"} for q, a in _QA] * 4)
    rm = tmp_path / "rm"
    run_script("reward_model.py", "--model_name_or_path", tiny_model, "--dataset_name", pref, "--output_dir", rm,
               "--max_steps", 40, "--learning_rate", 1e-3, "--per_device_train_batch_size", 8, "--logging_steps", 10)
    out = tmp_path / "run"
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Q: {q}\nA:"} for q, _ in _QA])
    run_script("ppo.py", *small_run(tiny_model, prompts, out, "--reward_model_name_or_path", rm, "--num_iterations", 20,
                                    "--learning_rate", 3e-3, "--critic_learning_rate", 3e-3, "--lr_scheduler", "constant"))
    scores = [r["objective/scores"] for r in metrics(out) if "objective/scores" in r]
    first, last = statistics.fmean(scores[:3]), statistics.fmean(scores[-3:])
    print(f"reward-model score: first 3 iterations {first:.3f}, last 3 iterations {last:.3f}")
    assert last > first + 1.0, (first, last)


# ---- scale: two processes, resume ----


def test_two_processes_log_the_mean_over_processes(tiny_model, data_files, reward_file, run_accelerate, metrics,
                                                   tmp_path, monkeypatch):
    monkeypatch.setenv("PPO_DUMP_PROCESS_METRICS", "1")
    out = tmp_path / "run"
    run_accelerate("ppo.py", "--model_name_or_path", tiny_model, "--dataset_name", data_files["prompts"],
                   "--output_dir", out, "--reward_fn", f"{reward_file}:count_bang", "--per_device_prompt_batch_size", 4,
                   "--samples_per_prompt", 2, "--num_minibatches", 2, "--per_device_train_batch_size", 2,
                   "--max_new_tokens", 8, "--top_k", 0, "--num_iterations", 2, "--eval_split", "train[:3]",
                   "--eval_steps", 2)
    logged = [r for r in metrics(out) if "objective/scores" in r]
    per_process = [[json.loads(line) for line in open(out / f"metrics_process{i}.jsonl")] for i in range(2)]
    assert len(logged) == 2 and all(len(p) == 2 for p in per_process)
    differs = False
    for s, row in enumerate(logged):
        assert row["episode"] == (s + 1) * 4 * 2 * 2  # per-device prompts x samples x processes
        for name, value in per_process[0][s].items():
            if name in ("step", "time/rollout_seconds", "time/update_seconds", "memory/peak_gb"):
                continue
            values = [per_process[0][s][name], per_process[1][s][name]]
            expected = sum(values) if name == "val/num_eos_tokens" else statistics.fmean(values)
            assert row[name] == pytest.approx(expected, rel=1e-5, abs=1e-6), name
            differs |= values[0] != values[1]
    assert differs  # the two processes really did see different rollouts
    assert [r["step"] for r in metrics(out) if "eval/score" in r] == [2]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_resume_continues_the_same_run(tiny_model, data_files, reward_file, run_script, metrics, weights, tmp_path):
    common = ("--reward_fn", f"{reward_file}:count_bang", "--num_iterations", 4, "--learning_rate", 1e-3,
              "--critic_learning_rate", 1e-3)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_script("ppo.py", *small_run(tiny_model, data_files["prompts"], full, *common, "--save_steps", 2))
    shutil.copytree(full / "checkpoints" / "step_2", resumed / "checkpoints" / "step_2")
    proc = run_script("ppo.py", *small_run(tiny_model, data_files["prompts"], resumed, *common,
                                           "--resume_from_checkpoint", "latest"))
    assert "resumed from" in proc.stdout + proc.stderr
    a = [r for r in metrics(full) if r["step"] > 2]
    b = metrics(resumed)
    assert [r["step"] for r in b] == [3, 4]
    for ra, rb in zip(a, b):
        for name in ("objective/scores", "objective/kl", "loss/policy", "loss/value", "episode", "lr"):
            assert rb[name] == pytest.approx(ra[name], rel=1e-4, abs=1e-6), name
    wa, wb = weights(full), weights(resumed)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


# ---- bad input ----


def test_bad_input_fails_with_a_clear_message(tiny_model, data_files, reward_file, run_script, tmp_path):
    empty = write_jsonl(tmp_path / "empty_prompts.jsonl", [{"prompt": ""}, {"prompt": ""}])
    proc = run_script("ppo.py", *small_run(tiny_model, empty, tmp_path / "a", "--reward_fn", f"{reward_file}:count_bang"),
                      check=False)
    assert proc.returncode != 0 and "error: train: no prompts" in proc.stderr
    assert "Loading weights" not in proc.stderr + proc.stdout  # failed before any model loaded
    proc = run_script("ppo.py", *small_run(tiny_model, data_files["prompts"], tmp_path / "b", "--reward_fn",
                                           f"{reward_file}:wrong_length", "--num_iterations", 1), check=False)
    assert proc.returncode != 0
    assert "error: --reward_fn" in proc.stderr and "returned 33 scores for 32 completions" in proc.stderr


def test_bad_arguments_and_data_in_process(tmp_path, reward_file):
    with pytest.raises(ppo.DataError, match="exactly one of"):
        ppo.main(ppo.Args(reward_fn=None, reward_model_name_or_path=None))
    with pytest.raises(ppo.DataError, match="exactly one of"):
        ppo.main(ppo.Args(reward_fn=f"{reward_file}:count_bang", reward_model_name_or_path="rm"))
    with pytest.raises(ppo.DataError, match="has no function 'nope'"):
        ppo.load_reward_fn(f"{reward_file}:nope")
    with pytest.raises(ppo.DataError, match="expected 'path/to/file.py:function'"):
        ppo.load_reward_fn("missing.py:f")
    with pytest.raises(ppo.DataError, match="no data"):
        ppo.load_split(write_jsonl(tmp_path / "nothing.jsonl", []), None, "train")
    with pytest.raises(ppo.DataError, match=r"columns \['text'\]; expected a prompt source"):
        ppo.to_prompts(ppo.Dataset.from_list([{"text": "hi"}]))


def test_prompts_from_every_prompt_source(data_files):
    tok = build_tokenizer(pad=True)
    expected_last = {"prompts": "Q: Tell me a joke.\nA:", "prompt_completion": "Q: Tell me a joke.\nA:",
                     "preference": "Q: Tell me a joke.\nA:",
                     "hh": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: Tell me a joke.\n\nAssistant:"}
    for shape in ("prompts", "prompt_completion", "preference", "preference_messages", "hh", "messages", "saferlhf"):
        prompts = ppo.to_prompts(ppo.load_split(data_files[shape], None, "train"))
        assert len(prompts) == 8, shape
        if shape in expected_last:
            assert prompts[-1] == expected_last[shape]
        ids = ppo.tokenize_prompts(prompts, tok, 512, shape)
        assert len(ids) == 8 and all(ids)
    # a conversation's prompt is everything before its last assistant turn
    messages = ppo.to_prompts(ppo.load_split(data_files["messages"], None, "train"))
    assert [m["role"] for m in messages[0]] == ["system", "user", "assistant", "user"]
    assert ppo.tokenize_prompts(["x " * 50], tok, 7, "long")[0] == tok("x " * 50).input_ids[-7:]
