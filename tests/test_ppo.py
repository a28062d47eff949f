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
from conftest import _QA, REPO, build_config, build_tokenizer, write_jsonl
from safetensors.torch import load_file

import ppo

# The six names of docs/design.md section 6 that every iteration logs, plus our timing and memory.
TRAIN_METRICS = [
    "objective/scores",
    "objective/kl",
    "objective/entropy",
    "objective/non_score_reward",
    "objective/rlhf_reward",
    "policy/approxkl",
    "policy/clipfrac",
    "loss/policy",
    "loss/value",
    "val/clipfrac",
    "val/explained_variance",
    "val/num_eos_tokens",
    "episode",
    "lr",
    "eps",
    "time/rollout_seconds",
    "time/update_seconds",
    "memory/peak_gb",
]

REWARD_FN = '''
def count_bang(prompts, completions):
    """The number of '!' in the response: a reward the tiny random policy can learn quickly."""
    return [float(c.count("!")) for c in completions]


def offset_bang(prompts, completions):
    """count_bang shifted and scaled: the running value statistics jump in iteration 1."""
    return [5.0 + 3.0 * c.count("!") for c in completions]


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
    return [
        "--model_name_or_path",
        policy,
        "--dataset_name",
        prompts,
        "--output_dir",
        out,
        "--per_device_prompt_batch_size",
        8,
        "--samples_per_prompt",
        4,
        "--num_minibatches",
        2,
        "--per_device_train_batch_size",
        16,
        "--local_rollout_forward_batch_size",
        32,
        "--max_new_tokens",
        16,
        "--top_k",
        0,
        *extra,
    ]


def in_process(policy, prompts, out, **extra) -> dict:
    """small_run's settings as Args keywords, for runs of main() in this process (no launch cost)."""
    return {
        **dict(  # noqa: C408
            model_name_or_path=policy, dataset_name=prompts, output_dir=str(out), per_device_prompt_batch_size=8,
               samples_per_prompt=4, num_minibatches=2, per_device_train_batch_size=16,
               local_rollout_forward_batch_size=32, max_new_tokens=16, top_k=0),
        **extra,
    }  # fmt: skip


def save_reward_model(tokenizer, path, arch="llama", seed=0, mean=0.0, std=1.0):
    """A reward_model.py-shaped checkpoint built from config (the contract), with its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = build_config(arch, tokenizer)
    config.num_labels = (
        1  # transformers 5: from_config(config, num_labels=1) is refused, so set it on the config
    )
    model = AutoModelForSequenceClassification.from_config(config)
    model.config.pad_token_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
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
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["Q: what is the answer? A: it is!"] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


# ---- learning ----


def test_learns_with_a_reward_function(
    tiny_model, data_files, reward_file, run_script, metrics, tmp_path
):
    out = tmp_path / "run"
    run_script(
        "ppo.py",
        *small_run(
            tiny_model,
            data_files["prompts"],
            out,
            "--reward_fn",
            f"{reward_file}:count_bang",
            "--num_iterations",
            20,
            "--learning_rate",
            3e-3,
            "--critic_learning_rate",
            3e-3,
            "--lr_scheduler",
            "constant",
            "--eval_split",
            "train[:4]",
            "--eval_steps",
            10,
            "--save_steps",
            10,
        ),
    )
    rows = metrics(out)
    train = [r for r in rows if "objective/scores" in r]
    assert [r["step"] for r in train] == list(range(1, 21))
    for name in TRAIN_METRICS:
        assert all(math.isfinite(r[name]) for r in train), name
    scores = [r["objective/scores"] for r in train]
    first, last = statistics.fmean(scores[:3]), statistics.fmean(scores[-3:])
    print(
        f"mean '!' count per response: first 3 iterations {first:.3f}, last 3 iterations {last:.3f}"
    )
    assert last > first + 1.0 and last > 3 * first, (first, last)
    kls = [r["objective/kl"] for r in train]
    # The reference starts as an exact copy of the policy. In fp32 the policy's log-probs come from
    # the cached generation pass, within ~1e-6 per token of the reference's full forward: not 0.0.
    assert abs(train[0]["objective/kl"]) < 1e-5
    assert statistics.fmean(kls) >= 0
    assert [r["episode"] for r in train] == [
        32 * s for s in range(1, 21)
    ]  # rollout batch = 8 prompts x 4 samples
    # eval, best checkpoint, samples, a loadable policy
    evals = [r for r in rows if "eval/score" in r]
    assert [r["step"] for r in evals] == [10, 20] and all(
        math.isfinite(r["eval/kl"]) for r in evals
    )
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["eval/score"] == max(r["eval/score"] for r in evals)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {10, 20} and all(
        {"prompt", "completion", "score"} <= set(s) for s in samples
    )
    from transformers import AutoModelForCausalLM

    for d in (out, out / "best"):
        AutoModelForCausalLM.from_pretrained(d)
    # key factor 3: with the default ref_ema the checkpointed reference has moved away from the SFT policy
    assert not reference_equals_sft(out / "checkpoints" / "step_10", tiny_model)


def reference_equals_sft(checkpoint: Path, sft_dir) -> bool:
    """The EMA'd reference is saved beside the checkpoint as safetensors (nothing pickled)."""
    from conftest import load_weights
    from safetensors.torch import load_file

    assert not list(checkpoint.glob("*.pkl")) or not list(checkpoint.glob("custom_checkpoint_*"))
    ref = load_file(str(checkpoint / "reference.safetensors"))
    sft = load_weights(sft_dir)
    return all(torch.equal(ref[k], sft[k]) for k in sft)


def test_reward_model_path_and_baseline_switches(
    tiny_model, tokenizer_dir, data_files, run_script, metrics, tmp_path
):
    """A from-config reward model (the contract shape), with Table 3's 'baseline PPO' switches:
    no advantage whitening, ref_ema 0 (the reference stays the SFT model), small batch."""
    from transformers import AutoTokenizer

    rm = save_reward_model(
        AutoTokenizer.from_pretrained(tokenizer_dir), tmp_path / "rm", mean=0.5, std=2.0
    )
    out = tmp_path / "run"
    proc = run_script(
        "ppo.py",
        *small_run(
            tiny_model,
            data_files["prompts"],
            out,
            "--reward_model_name_or_path",
            rm,
            "--normalize_reward",
            "--num_iterations",
            2,
            "--save_steps",
            1,
            "--no-whiten_advantages",
            "--ref_ema",
            0,
            "--missing_eos_penalty",
            -10.0,
            "--num_minibatches",
            1,
            "--temperature",
            0.7,
            "--eval_split",
            "train[:4]",
        ),
    )
    # the first line says what runs: one optimizer step = 2 micro-batches of 16 responses
    first = "1 process, device cpu, fp32, global batch 32 responses (16 per device x 1 x 2 accumulation)"
    assert proc.stdout.splitlines()[0] == first, proc.stdout[:300]
    train = [r for r in metrics(out) if "objective/scores" in r]
    assert len(train) == 2 and all(math.isfinite(r[k]) for r in train for k in TRAIN_METRICS)
    # evaluation scores as training does: an unfinished greedy answer gets the missing-EOS penalty
    # (so best/ never keeps a policy that never stops); the raw score is logged beside it
    (ev,) = [r for r in metrics(out) if "eval/score" in r]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["score"] in (s["raw_score"], -10.0) for s in samples)
    assert any(
        s["score"] == -10.0 != s["raw_score"] for s in samples
    )  # the untrained model rambles
    assert ev["eval/score"] == pytest.approx(statistics.fmean(s["score"] for s in samples))
    assert ev["eval/raw_score"] == pytest.approx(statistics.fmean(s["raw_score"] for s in samples))
    assert json.loads((out / "best" / "best.json").read_text())["eval/score"] == ev["eval/score"]
    # One minibatch: the update's first forward sees exactly the rollout policy, so the rollout log-probs
    # (chunked, no_grad, at the sampling temperature) must equal the training forward's: ratio 1.
    assert all(r["policy/approxkl"] < 1e-9 and r["policy/clipfrac"] == 0 for r in train)
    args = json.loads((out / "args.json").read_text())
    assert args["whiten_advantages"] is False and args["ref_ema"] == 0.0
    assert reference_equals_sft(
        out / "checkpoints" / "step_1", tiny_model
    )  # ref_ema = 0: untouched


def test_scorer_reads_the_reward_at_the_last_token_normalized_and_retokenized(
    tok, tokenizer_dir, tmp_path
):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm_dir = save_reward_model(tok, tmp_path / "rm", mean=1.5, std=4.0)
    rm = ppo.disable_dropout(AutoModelForSequenceClassification.from_pretrained(rm_dir)).eval()
    prompts = [tok("Q: hi\nA:").input_ids, tok("Q: What is 2 + 2?\nA:").input_ids]
    originals = ["Q: hi\nA:", "Q: What is 2 + 2?\nA:"]
    rows = [{"prompt": t, "prompt_ids": ids} for t, ids in zip(originals, prompts)]
    batch = ppo.collate_prompts(rows, tok.pad_token_id)
    first = tok(" yes!").input_ids + [
        tok.eos_token_id,
        tok.pad_token_id,
    ]  # ends in EOS, then padding
    second = tok(" It is 4, or so they say, but ok").input_ids[: len(first)]  # no EOS: truncated
    responses = torch.tensor([first, second])
    responses, mask, has_eos = ppo.truncate_after_eos(responses, tok.eos_token_id, tok.pad_token_id)
    args = SimpleNamespace(
        normalize_reward=True, reward_fn=None, local_rollout_forward_batch_size=1
    )
    scorer = ppo.Scorer(args, tok, torch.device("cpu"), rm)
    scores = scorer(
        batch["input_ids"], batch["attention_mask"], responses, mask, has_eos, originals
    )
    with torch.no_grad():
        for b in range(2):  # score the unpadded sequence on its own: the head at its final token
            ids = prompts[b] + responses[b][mask[b].bool()].tolist()
            raw = ppo.score_tokens(
                rm, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)
            )[0, -1].item()
            assert scores[b].item() == pytest.approx((raw - 1.5) / 4.0, abs=1e-4)
    # a reward model with another vocabulary: the text is re-tokenized with its tokenizer
    other = build_other_tokenizer()
    assert not ppo.same_vocab(other, tok) and ppo.same_vocab(
        tok, AutoTokenizer.from_pretrained(tokenizer_dir)
    )
    other_rm = AutoModelForSequenceClassification.from_pretrained(
        save_reward_model(other, tmp_path / "rm_other")
    )
    scorer = ppo.Scorer(
        SimpleNamespace(normalize_reward=False, reward_fn=None, local_rollout_forward_batch_size=1),
        tok,
        torch.device("cpu"),
        other_rm,
        other,
    )
    scores = scorer(
        batch["input_ids"], batch["attention_mask"], responses, mask, has_eos, originals
    )
    with torch.no_grad():
        for b, (prompt, completion) in enumerate(
            [("Q: hi\nA:", " yes!"), ("Q: What is 2 + 2?\nA:", None)]
        ):
            completion = completion or tok.decode(responses[1].tolist())
            ids = other(prompt).input_ids + ppo.tokenize_after(other, prompt, completion)
            ids += [other.eos_token_id] if has_eos[b] else []
            raw = ppo.score_tokens(
                other_rm, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)
            )[0, -1].item()
            assert scores[b].item() == pytest.approx(raw, abs=1e-4)


def test_reward_model_with_another_vocabulary_is_retokenized_and_the_critic_starts_from_the_policy(
    tiny_model, data_files, metrics, weights, tmp_path, capsys
):
    """With no --value_model_name_or_path the critic would read the policy's token ids with
    the reward model's embeddings (IndexError here: 300 < 400 tokens); it starts from the policy."""
    rm = save_reward_model(build_other_tokenizer(), tmp_path / "rm_other")
    out = tmp_path / "run"
    ppo.main(ppo.Args(**in_process(tiny_model, data_files["prompts"], out, reward_model_name_or_path=rm,
                                   num_iterations=2, save_steps=1)))  # fmt: skip
    printed = capsys.readouterr().out
    assert "re-tokenized" in printed
    assert printed.count("the critic starts from the policy") == 1
    assert math.isfinite(metrics(out)[0]["objective/scores"])
    critic = weights(out / "checkpoints" / "step_1" / "critic")  # the checkpoint's critic/ folder
    assert critic["model.embed_tokens.weight"].shape[0] == 400  # the policy's vocabulary


def test_learns_with_a_trained_reward_model(tiny_model, reward_file, run_script, metrics, tmp_path):
    """reward_model.py learns 'more ! is better' from preference pairs; PPO then raises that reward."""
    pref = write_jsonl(
        tmp_path / "pref.jsonl",
        [{"prompt": f"Q: {q}\nA:", "chosen": f" {a} !!!!", "rejected": f" {a}"} for q, a in _QA]
        * 4,
    )
    rm = tmp_path / "rm"
    run_script(
        "reward_model.py",
        "--model_name_or_path",
        tiny_model,
        "--dataset_name",
        pref,
        "--output_dir",
        rm,
        "--max_steps",
        40,
        "--learning_rate",
        1e-3,
        "--per_device_train_batch_size",
        8,
        "--logging_steps",
        10,
    )
    out = tmp_path / "run"
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Q: {q}\nA:"} for q, _ in _QA])
    run_script(
        "ppo.py",
        *small_run(
            tiny_model,
            prompts,
            out,
            "--reward_model_name_or_path",
            rm,
            "--num_iterations",
            20,
            "--learning_rate",
            3e-3,
            "--critic_learning_rate",
            3e-3,
            "--lr_scheduler",
            "constant",
        ),
    )
    scores = [r["objective/scores"] for r in metrics(out) if "objective/scores" in r]
    first, last = statistics.fmean(scores[:3]), statistics.fmean(scores[-3:])
    print(f"reward-model score: first 3 iterations {first:.3f}, last 3 iterations {last:.3f}")
    assert last > first + 1.0, (first, last)


# ---- scale: two processes, resume ----


def test_resume_continues_the_same_run(
    tiny_model, data_files, reward_file, run_script, metrics, weights, tmp_path
):
    """A resume mid-epoch (8 prompts, 2 per iteration: 4 iterations per epoch; checkpoint at 2)
    continues with the same prompts and the same sampling noise as the uninterrupted run. The run it
    resumes was killed after logging step 4: its metrics and samples rows after step 2 are re-run."""
    common = (
        "--reward_fn",
        f"{reward_file}:count_bang",
        "--num_iterations",
        4,
        "--eval_split",
        "train[:2]",
        "--eval_steps",
        1,
        "--num_samples",
        1,
        "--per_device_prompt_batch_size",
        2,
        "--per_device_train_batch_size",
        4,
        "--local_rollout_forward_batch_size",
        8,
        "--learning_rate",
        1e-3,
        "--critic_learning_rate",
        1e-3,
    )
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_script(
        "ppo.py", *small_run(tiny_model, data_files["prompts"], full, *common, "--save_steps", 2)
    )
    shutil.copytree(full / "checkpoints" / "step_2", resumed / "checkpoints" / "step_2")
    for name in ("args.json", "metrics.jsonl", "samples.jsonl"):
        shutil.copy(full / name, resumed / name)
    proc = run_script(
        "ppo.py",
        *small_run(
            tiny_model,
            data_files["prompts"],
            resumed,
            *common,
            "--resume_from_checkpoint",
            "latest",
        ),
    )
    assert "resumed from" in proc.stdout + proc.stderr
    a, b = metrics(full), metrics(resumed)
    assert [r["step"] for r in b] == [r["step"] for r in a] == [1, 1, 2, 2, 3, 3, 4, 4]

    def timeless(row):
        return {
            k: v for k, v in row.items() if k != "eps" and not k.startswith(("time/", "memory/"))
        }

    for ra, rb in zip(a, b, strict=True):
        assert timeless(rb) == pytest.approx(timeless(ra), rel=1e-6, abs=1e-6)
    samples = (resumed / "samples.jsonl").read_text()
    assert [json.loads(r)["step"] for r in samples.splitlines()] == [1, 2, 3, 4]
    assert samples == (full / "samples.jsonl").read_text()
    wa, wb = weights(full), weights(resumed)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def logged_step(out) -> int:
    """The step of the last complete row of metrics.jsonl (0 if none), read while the run writes it."""
    path = Path(out) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return max(steps, default=0)


def test_survives_sigkill_at_any_moment(
    tiny_model, data_files, reward_file, run_script, run_killed, metrics, weights, tmp_path
):
    """A run SIGKILLed three times, each time continued with --resume_from_checkpoint latest: the
    moment checkpoint step_2 appears under its complete name (the EMA'd reference must already be in
    it), while step_3 is being written (after step 3's metrics and samples were logged), and after
    the last step's metrics were logged (during its evaluation and the final save). It ends with the
    uninterrupted run's weights, every step once in metrics.jsonl and samples.jsonl, the same best/."""
    common = ("--reward_fn", f"{reward_file}:count_bang", "--num_iterations", 4,
              "--save_steps", 1, "--eval_split", "train[:2]", "--eval_steps", 1, "--num_samples", 1,
              "--per_device_prompt_batch_size", 2, "--per_device_train_batch_size", 4,
              "--local_rollout_forward_batch_size", 8, "--learning_rate", 1e-3,
              "--critic_learning_rate", 1e-3)  # fmt: skip
    full, out = tmp_path / "full", tmp_path / "killed"
    run_script("ppo.py", *small_run(tiny_model, data_files["prompts"], full, *common))
    args = small_run(tiny_model, data_files["prompts"], out, *common)
    resume = [*args, "--resume_from_checkpoint", "latest"]
    ckpts = out / "checkpoints"
    run_killed("ppo.py", *args, when=lambda: (ckpts / "step_2").exists())
    assert (ckpts / "step_2" / "reference.safetensors").exists()
    run_killed("ppo.py", *resume, when=lambda: (ckpts / "step_3.tmp").exists())
    run_killed("ppo.py", *resume, when=lambda: logged_step(out) == 4)
    proc = run_script("ppo.py", *resume)
    assert f"resumed from {ckpts / 'step_3'} at step 3" in proc.stdout + proc.stderr
    assert [r["step"] for r in metrics(out)] == [r["step"] for r in metrics(full)]
    samples = (out / "samples.jsonl").read_text()
    assert [json.loads(r)["step"] for r in samples.splitlines()] == [1, 2, 3, 4]
    assert samples == (full / "samples.jsonl").read_text()
    assert (out / "best" / "best.json").read_text() == (full / "best" / "best.json").read_text()
    wa, wb = weights(full), weights(out)
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


# ---- bad input ----


def test_prompts_from_every_prompt_source(data_files):
    tok = build_tokenizer(pad=True)
    expected_last = {
        "prompts": "Q: Tell me a joke.\nA:",
        "prompt_completion": "Q: Tell me a joke.\nA:",
        "preference": "Q: Tell me a joke.\nA:",
        "hh": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: Tell me a joke.\n\nAssistant:",
    }
    for shape in (
        "prompts",
        "prompt_completion",
        "preference",
        "preference_messages",
        "hh",
        "messages",
    ):
        prompts = ppo.to_prompts(ppo.load_split(data_files[shape], None, "train"))
        assert len(prompts) == 8, shape
        if shape in expected_last:
            assert prompts[-1] == expected_last[shape]
        ids = [p["prompt_ids"] for p in ppo.tokenize_prompts(prompts, tok, 528, 512, shape)]
        assert len(ids) == 8 and all(ids)
    # a conversation's prompt is everything before its last assistant turn
    messages = ppo.to_prompts(ppo.load_split(data_files["messages"], None, "train"))
    assert [m["role"] for m in messages[0]] == ["system", "user", "assistant", "user"]
    kept = ppo.tokenize_prompts(["x " * 50], tok, 23, 7, "long")[0]["prompt_ids"]
    assert kept == tok("x " * 50).input_ids[-7:]


# ---- where users run it (DeepSpeed ZeRO-2/3, bf16, gradient checkpointing), on CPU ----

LOGGING_REWARD = '''
import json, os
from pathlib import Path


def logged_bang(prompts, completions):
    """count_bang that also records what this process sampled (the test reads it back)."""
    with open(Path(__file__).parent / f"rollouts.rank{os.environ.get('RANK', '0')}.jsonl", "a") as f:
        f.write(json.dumps(completions) + "\\n")
    return [float(c.count("!")) for c in completions]
'''


@pytest.fixture(scope="module")
def same_prompt_run(tiny_model, tmp_path_factory, run_accelerate):
    """One DDP run (2 processes) on 8 copies of one prompt; the reference for the ZeRO-3 comparison."""
    d = tmp_path_factory.mktemp("ddp")
    (d / "reward.py").write_text(LOGGING_REWARD)
    prompts = write_jsonl(d / "same.jsonl", [{"prompt": "Q: Say hello.\nA:"}] * 8)
    args = ["--model_name_or_path", tiny_model, "--dataset_name", prompts, "--reward_fn", f"{d}/reward.py:logged_bang",
            "--per_device_prompt_batch_size", 4, "--samples_per_prompt", 2, "--num_minibatches", 2,
            "--per_device_train_batch_size", 2, "--local_rollout_forward_batch_size", 8, "--max_new_tokens", 8,
            "--top_k", 0, "--num_iterations", 2, "--learning_rate", 1e-3, "--critic_learning_rate", 1e-3,
            "--max_grad_norm", 1e6]  # fmt: skip
    run_accelerate("ppo.py", *args, "--output_dir", d / "out")
    return SimpleNamespace(dir=d, args=args, out=d / "out")


def test_two_processes_draw_their_own_sampling_noise(same_prompt_run):
    """Identical prompts on two processes: the rollouts differ (each process seeds seed + 100003 x rank)."""
    ranks = [
        [
            json.loads(line)
            for line in (same_prompt_run.dir / f"rollouts.rank{r}.jsonl").read_text().splitlines()
        ]
        for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 2
    assert ranks[0][0] != ranks[1][0]


# Every ZeRO stage x precision (each launch ~5 CPU-seconds from the warm interpreter).
@pytest.mark.parametrize("stage,bf16", [(2, False), (2, True), (3, False), (3, True)])
def test_deepspeed_zero(stage, bf16, same_prompt_run, run_deepspeed, weights, metrics, tmp_path):
    """ZeRO-2/3, fp32/bf16, 2 CPU processes: exit 0, a policy that plain from_pretrained loads, and in
    fp32 ZeRO-3 the DDP run's weights (same global batch and seed; gradient clipping off, since DDP
    clips actor and critic separately and DeepSpeed jointly)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    run_deepspeed("ppo.py", *same_prompt_run.args, "--output_dir", out, "--save_steps", 1,
                  *(["--bf16"] if bf16 else []), stage=stage, bf16=bf16)  # fmt: skip
    AutoModelForCausalLM.from_pretrained(out)
    assert [r["step"] for r in metrics(out)] == [1, 2]
    ref = weights(out / "checkpoints" / "step_1")  # the EMA'd reference, full tensors, fp32
    assert all(
        v.dtype == torch.float32 and v.numel() > 0
        for k, v in ref.items()
        if not k.startswith(("policy.", "critic."))
    )
    if stage == 3 and not bf16:
        ddp, zero3 = weights(same_prompt_run.out), weights(out)
        assert ddp.keys() == zero3.keys()
        diff = max((ddp[k] - zero3[k]).abs().max().item() for k in ddp)
        assert diff <= 1e-4, diff


def test_bf16_checkpoint_trains_in_fp32_and_the_ema_reference_moves(tiny_model_bf16, data_files, reward_file,
                                                                     weights, tmp_path):  # fmt: skip
    out = tmp_path / "run"
    ppo.main(ppo.Args(**in_process(tiny_model_bf16, data_files["prompts"], out, reward_fn=f"{reward_file}:count_bang",
                                   num_minibatches=1, per_device_train_batch_size=32, learning_rate=1e-5,
                                   num_iterations=2, save_steps=1)))  # fmt: skip
    ckpt = out / "checkpoints" / "step_1"
    before, policy = weights(tiny_model_bf16), load_file(str(ckpt / "model.safetensors"))
    reference = load_file(str(ckpt / "reference.safetensors"))
    changed = total = ref_changed = 0
    for k, v in before.items():  # one optimizer step at lr 1e-5
        if k in policy:  # (the policy's tied lm_head is stored once, as the embedding)
            changed += (policy[k] != v.float()).sum().item()
            total += v.numel()
            assert policy[k].dtype == torch.float32
        ref_changed += (reference[k] != v.float()).sum().item()
        assert reference[k].dtype == torch.float32
    assert changed / total > 0.9 and ref_changed / total > 0.9, (
        changed / total,
        ref_changed / total,
    )


def test_greedy_eval_is_the_same_with_gradient_checkpointing(
    tiny_model, data_files, reward_file, tmp_path
):
    samples = []
    for gc in (False, True):
        out = tmp_path / f"gc{gc}"
        ppo.main(ppo.Args(**in_process(tiny_model, data_files["prompts"], out, reward_fn=f"{reward_file}:count_bang",
                                       num_iterations=1, eval_split="train[:4]", max_new_tokens=12,
                                       gradient_checkpointing=gc)))  # fmt: skip
        samples.append(
            [
                json.loads(line)["completion"]
                for line in (out / "samples.jsonl").read_text().splitlines()
            ]
        )
    assert samples[0] == samples[1] and len(samples[0]) == 4


def test_checkpoint_generation_config_does_not_leak_into_sampling(
    tiny_model, data_files, reward_file, tmp_path
):
    """A checkpoint whose generation_config.json sets repetition_penalty=1.3: the rollout samples from
    exactly the distribution whose log-probs PPO uses, and the saved policy carries the clean config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy_dir = tmp_path / "policy"
    shutil.copytree(tiny_model, policy_dir)
    config = json.loads((policy_dir / "generation_config.json").read_text())
    (policy_dir / "generation_config.json").write_text(
        json.dumps({**config, "repetition_penalty": 1.3})
    )
    tok = AutoTokenizer.from_pretrained(policy_dir)
    args = ppo.Args(model_name_or_path=str(policy_dir), reward_fn="x.py:f")
    policy = ppo.load_pretrained(AutoModelForCausalLM, str(policy_dir), torch.float32, args)
    assert policy.generation_config.repetition_penalty == 1.3
    policy.generation_config = ppo.generation_config(tok, 12, True, 0.7, 0, 1.0)  # as main() does
    texts = ["Q: Say hello.\nA:", "Q: hi\nA:"]
    batch = ppo.collate_prompts(
        [{"prompt": t, "prompt_ids": tok(t).input_ids} for t in texts], tok.pad_token_id
    )
    torch.manual_seed(0)
    out = policy.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          generation_config=policy.generation_config, output_scores=True,
                          return_dict_in_generate=True)  # fmt: skip
    sampled = torch.stack(out.scores, 1).log_softmax(
        -1
    )  # the processed distribution actually sampled
    responses = out.sequences[:, batch["input_ids"].shape[1] :]
    model = ppo.PolicyAndValue(policy, None)
    ids, mask = (
        torch.cat([batch["input_ids"], responses], 1),
        torch.cat([batch["attention_mask"], torch.ones_like(responses)], 1),
    )
    with torch.no_grad():
        logits, _ = model(ids, mask, responses.shape[1], with_values=False)
    logp = ppo.response_logprobs(logits, responses, 0.7)
    expected = sampled.gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logp, expected, atol=1e-4), (logp - expected).abs().max()
    # end to end: the saved policy's generation config is the rollout's, not the checkpoint's
    out_dir = tmp_path / "run"
    ppo.main(ppo.Args(**in_process(str(policy_dir), data_files["prompts"], out_dir, reward_fn=f"{reward_file}:count_bang",
                                   num_iterations=1)))  # fmt: skip
    assert (
        json.loads((out_dir / "generation_config.json").read_text()).get("repetition_penalty", 1.0)
        == 1.0
    )


def test_step0_kl_is_exactly_zero_under_bf16_with_an_fp32_reference(fresh_accelerator_state, tiny_model, data_files, reward_file, metrics,
                                                                      tmp_path):  # fmt: skip
    out = tmp_path / "run"
    ppo.main(ppo.Args(**in_process(tiny_model, data_files["prompts"], out, reward_fn=f"{reward_file}:count_bang",
                                   num_iterations=1, bf16=True, ref_ema=0.01)))  # fmt: skip
    assert metrics(out)[0]["objective/kl"] == 0.0


# ---- the critic learns from iteration 1; metrics reduced exactly ----


def test_value_clip_window_is_centred_on_the_critic_output(tiny_model, data_files, reward_file, metrics, weights,
                                                            tmp_path):  # fmt: skip
    """Centred on re-normalized values (f8cb464), iteration 1 clipped every token (val/clipfrac 1.0) and
    the critic did not move; centred on the critic's own rollout output it learns at once."""
    out = tmp_path / "run"
    ppo.main(ppo.Args(**in_process(tiny_model, data_files["prompts"], out, reward_fn=f"{reward_file}:offset_bang",
                                   num_iterations=2, save_steps=1, critic_learning_rate=1e-4)))  # fmt: skip
    assert metrics(out)[0]["val/clipfrac"] < 0.5
    before, critic = weights(tiny_model), weights(out / "checkpoints" / "step_1" / "critic")
    moved = [k for k in before if k != "lm_head.weight" and not torch.equal(critic[k], before[k])]
    assert len(moved) == len(before) - 1


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory):
    """The tiny Llama with the EOS logit tied to token 183's (slightly larger): greedy responses end at
    different lengths, so processes hold different token counts."""
    from conftest import save_tiny_model
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(
        "llama", build_tokenizer(pad=True), tmp_path_factory.mktemp("eos") / "model"
    )
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight[model.config.eos_token_id] = model.lm_head.weight[183] * 1.01
    model.save_pretrained(path)
    return path


def test_two_processes_log_the_same_metrics_as_one_process(eos_model, data_files, reward_file, run_accelerate,
                                                           run_script, metrics, tmp_path):  # fmt: skip
    """Item 5: sums and token counts are reduced, then divided once. Greedy sampling (top-k 1) makes the
    rollouts independent of the sampling noise, so a 2-process run with the same global batch logs what a
    1-process run logs, although the processes hold different numbers of response tokens."""
    common = ["--model_name_or_path", eos_model, "--dataset_name", data_files["prompts"], "--reward_fn",
              f"{reward_file}:count_bang", "--num_minibatches", 1, "--max_new_tokens", 8, "--top_k", 1,
              "--num_iterations", 2, "--learning_rate", 1e-3, "--critic_learning_rate", 1e-3]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    run_script("ppo.py", *common, "--output_dir", one, "--per_device_prompt_batch_size", 8,
               "--per_device_train_batch_size", 8)  # fmt: skip
    run_accelerate("ppo.py", *common, "--output_dir", two, "--per_device_prompt_batch_size", 4,
                   "--per_device_train_batch_size", 4)  # fmt: skip
    rows_one, rows_two = metrics(one), metrics(two)
    assert len(rows_one) == len(rows_two) == 2
    assert 0 < rows_one[0]["val/num_eos_tokens"] < 8  # responses of different lengths
    for a, b in zip(rows_one, rows_two):
        for name in TRAIN_METRICS:
            if name in ("eps", "time/rollout_seconds", "time/update_seconds", "memory/peak_gb"):
                continue
            assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-6), name


def test_deepspeed_config_with_its_own_gradient_accumulation_is_refused(
    tiny_model, data_files, reward_file, run_deepspeed, tmp_path
):
    """accelerate would keep the DeepSpeed config's gradient_accumulation_steps over the script's (wrong
    minibatches, an LR schedule ending early): one line instead. One process: the refusal comes before
    any sharding."""
    config = (REPO / "accelerate_configs" / "deepspeed_zero2.yaml").read_text()
    config = config.replace(
        "deepspeed_config:\n", "deepspeed_config:\n  gradient_accumulation_steps: 3\n"
    )
    (tmp_path / "ds.yaml").write_text(config)
    args = small_run(tiny_model, data_files["prompts"], tmp_path / "out", "--reward_fn",
                     f"{reward_file}:count_bang", "--num_iterations", 1, "--per_device_prompt_batch_size", 4,
                     "--per_device_train_batch_size", 8)  # fmt: skip
    proc = run_deepspeed(
        "ppo.py", *args, config_file=tmp_path / "ds.yaml", num_processes=1, check=False
    )
    assert proc.returncode != 0
    assert "error: the DeepSpeed config sets gradient_accumulation_steps=3" in proc.stderr, (
        proc.stderr[-3000:]
    )
    assert not (tmp_path / "out" / "model.safetensors").exists()
