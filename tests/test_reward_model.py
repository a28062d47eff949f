"""reward_model.py: loss math, last-token index, padding invariance, data shapes, bad input, learning,
interoperability, --eval_only, 2 processes and resume."""

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import main_error, write_jsonl

import reward_model as rm

ARCHS = ("llama", "qwen2", "gpt_neox", "gpt2")


class _Args:
    """The few Args fields load_tokenizer / load_reward_model read."""

    def __init__(self, path):
        self.model_name_or_path, self.tokenizer_name_or_path, self.trust_remote_code = (
            path,
            None,
            False,
        )
        self.chat_template_path = self.attn_implementation = None


def load_fresh(path, seed=0):
    """The script's own model setup: AutoModelForSequenceClassification + a fresh N(0, 1/(d+1)) head."""
    torch.manual_seed(seed)
    tokenizer = rm.load_tokenizer(_Args(path))
    model, fresh = rm.load_reward_model(_Args(path), tokenizer)
    assert fresh
    rm.init_head(model.score)
    return model.eval(), tokenizer


# ---- pure math ----


def test_reward_loss_hand_values():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    # -log sigmoid(d) = log(1 + exp(-d)); d = 1 and d = -2
    expected = torch.tensor([math.log(1 + math.exp(-1)), math.log(1 + math.exp(2))])
    torch.testing.assert_close(rm.reward_loss(chosen, rejected), expected)
    # margin: d = 1 - 0.5 and d = -2 - (-1)
    margin = torch.tensor([0.5, -1.0])
    expected_m = torch.tensor([math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1))])
    torch.testing.assert_close(rm.reward_loss(chosen, rejected, margin), expected_m)
    # centring: + 0.1 * (r_chosen + r_rejected)^2 = + 0.1 * 1 and + 0.1 * 4
    torch.testing.assert_close(
        rm.reward_loss(chosen, rejected, center_rewards_coefficient=0.1),
        expected + torch.tensor([0.1, 0.4]),
    )
    torch.testing.assert_close(
        rm.reward_loss(chosen, rejected, margin, center_rewards_coefficient=0.1),
        expected_m + torch.tensor([0.1, 0.4]),
    )


def test_reward_loss_gradient_pushes_chosen_up():
    chosen, rejected = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    rm.reward_loss(chosen, rejected).sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.5) and rejected.grad.item() == pytest.approx(0.5)


def test_last_token_index_right_left_and_pad_eq_eos():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert rm.last_token_index(right).tolist() == [2, 4, 0]
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert rm.last_token_index(left).tolist() == [4, 4, 4]
    # pad == EOS (id 0): the ids cannot tell the final EOS from padding, the mask can
    eos = 0
    ids = torch.tensor([[7, 8, eos, eos, eos], [eos, eos, 7, 8, eos]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    assert rm.last_token_index(mask).tolist() == [2, 4]
    assert ids[torch.arange(2), rm.last_token_index(mask)].tolist() == [eos, eos]


# ---- padding invariance (the reward PPO and DPO-Iter read must not move with padding) ----


@pytest.mark.parametrize("arch", ARCHS + ("llama_nopad",))
def test_padding_invariance(arch, tiny_models):
    model, tok = load_fresh(tiny_models[arch])
    texts = [
        "Q: What is 2 + 2?\nA: It is 4.",
        "Hi",
        "The quick brown fox jumps over the lazy dog again and again.",
    ]
    seqs = [tok(t).input_ids + [tok.eos_token_id] for t in texts]
    with torch.no_grad():
        one = torch.cat(
            [
                rm.sequence_rewards(
                    model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)
                )
                for s in seqs
            ]
        )
        for side in ("left", "right"):
            ids = rm.pad(seqs, tok.pad_token_id, side)
            mask = rm.pad([[1] * len(s) for s in seqs], 0, side)
            batch = rm.sequence_rewards(model, ids, mask)
            assert torch.isfinite(batch).all()
            assert (batch - one).abs().max().item() <= 1e-5, (arch, side, batch, one)
    assert one.std() > 1e-3  # the rewards differ: the comparison is not vacuous


@pytest.mark.parametrize(
    "arch", ["gpt_neox", "gpt2"]
)  # their configs carry classifier/summary dropouts of 0.1
def test_dropout_disabled(arch, tiny_models):
    model, tok = load_fresh(tiny_models[arch])
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert all(
        v == 0.0 for k, v in model.config.to_dict().items() if "drop" in k and isinstance(v, float)
    )
    ids = torch.tensor([tok("The quick brown fox").input_ids])
    with torch.no_grad():
        evaluation = rm.sequence_rewards(model.eval(), ids, torch.ones_like(ids))
        training = rm.sequence_rewards(model.train(), ids, torch.ones_like(ids))
    assert torch.equal(evaluation, training)


# ---- data ----


def test_preference_shapes(tiny_model, data_files):
    tok = rm.load_tokenizer(_Args(tiny_model))
    for shape in ("preference", "preference_messages", "hh"):
        pairs = rm.to_reward_pairs(rm.load_split(data_files[shape], None, "train"))
        ex = rm.tokenize_pairs(pairs, tok, 512, None, shape)
        assert len(ex) == 8, shape
        for e in ex:
            assert e["chosen_ids"] != e["rejected_ids"]
            assert e["chosen_ids"][-1] == e["rejected_ids"][-1] == tok.eos_token_id
            assert e["margin"] == 0.0
    hh = rm.to_reward_pairs(rm.load_split(data_files["hh"], None, "train"))
    assert hh[0]["prompt"].endswith("\n\nAssistant:") and hh[0]["rejected"] == " I do not know."


def test_margin_column_and_collate(tmp_path, tiny_model):
    tok = rm.load_tokenizer(_Args(tiny_model))
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"prompt": "Q:", "chosen": " yes", "rejected": " no", "margin": 2},
            {"prompt": "Q:", "chosen": " good dog", "rejected": " bad", "margin": 0.5},
        ],
    )
    ex = rm.tokenize_pairs(
        rm.to_reward_pairs(rm.load_split(path, None, "train")), tok, 512, None, "m"
    )
    batch = rm.collate_reward_pairs(ex, tok.pad_token_id)
    assert batch["margin"].tolist() == [2.0, 0.5]
    assert batch["input_ids"].shape[0] == 4  # chosen, chosen, rejected, rejected in one batch
    assert batch["input_ids"][0].tolist()[: len(ex[0]["chosen_ids"])] == ex[0]["chosen_ids"]
    assert batch["input_ids"][2].tolist()[: len(ex[0]["rejected_ids"])] == ex[0]["rejected_ids"]
    assert batch["attention_mask"].sum(1).tolist() == [
        len(ex[0]["chosen_ids"]),
        len(ex[1]["chosen_ids"]),
        len(ex[0]["rejected_ids"]),
        len(ex[1]["rejected_ids"]),
    ]


def test_identical_pairs_dropped_with_count(tmp_path, tiny_model, capsys):
    tok = rm.load_tokenizer(_Args(tiny_model))
    rows = [
        {"prompt": "Q:", "chosen": " same", "rejected": " same"},
        {"prompt": "Q:", "chosen": " a", "rejected": " b"},
    ]
    ds = rm.to_reward_pairs(rm.load_split(write_jsonl(tmp_path / "i.jsonl", rows), None, "train"))
    assert len(rm.tokenize_pairs(ds, tok, 512, None, "train")) == 1
    assert "1 dropped (chosen identical to rejected)" in capsys.readouterr().out
    # identical after truncation counts too: the responses differ only beyond max_length
    rows = [{"prompt": "Q:", "chosen": " a b c d e f", "rejected": " a b c d e g"}]
    ds = rm.to_reward_pairs(rm.load_split(write_jsonl(tmp_path / "t.jsonl", rows), None, "train"))
    with pytest.raises(rm.DataError, match="identical"):
        rm.tokenize_pairs(ds, tok, 4, None, "train")


_BAD = {
    "missing_rejected": ([{"prompt": "Q:", "chosen": " a"}], [], "expected one of"),
    "all_identical": ([{"prompt": "Q:", "chosen": " a", "rejected": " a"}] * 3, [], "identical"),
}


@pytest.mark.parametrize("case", sorted(_BAD))
def test_bad_input_one_line_error(case, tmp_path, tiny_model, run_script):
    rows, extra, message = _BAD[case]
    path = write_jsonl(tmp_path / f"{case}.jsonl", rows)
    proc = run_script(
        "reward_model.py",
        "--model_name_or_path",
        tiny_model,
        "--dataset_name",
        path,
        "--output_dir",
        tmp_path / "out",
        *extra,
        check=False,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "LOAD REPORT" not in proc.stdout + proc.stderr  # failed before any model was loaded


# ---- learning, outputs, interoperability, --eval_only ----

_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "small",
    "model",
    "time",
    "once",
    "story",
    "kind",
    "nice",
    "happy",
]


def synthetic_pairs(n: int, seed: int) -> list:
    """The prompt asks for a word ('good' or 'okay', 3 tokens each in the tiny tokenizer); the chosen
    response contains it, the rejected one the other word at the same place. Lengths are equal within
    each pair, and each word is preferred half of the time, so no fixed bias (of an untrained model,
    or for length) scores above chance: the model must read the prompt and the response."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        want, other = rng.sample(["good", "okay"], 2)
        prompt = " ".join(rng.choices(_WORDS, k=rng.randint(1, 3)) + ["say", want]) + ":"
        words = rng.choices(_WORDS, k=rng.randint(3, 6))
        i = rng.randint(0, len(words))
        rows.append(
            {
                "prompt": prompt,
                "chosen": " " + " ".join(words[:i] + [want] + words[i:]),
                "rejected": " " + " ".join(words[:i] + [other] + words[i:]),
            }
        )
    return rows


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("rm_synthetic")
    write_jsonl(d / "train.jsonl", synthetic_pairs(256, seed=0))
    write_jsonl(d / "test.jsonl", synthetic_pairs(128, seed=1))
    return str(d)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, synthetic_data, run_script):
    out = tmp_path_factory.mktemp("rm_trained")
    run_script(
        "reward_model.py",
        "--model_name_or_path",
        tiny_model,
        "--dataset_name",
        synthetic_data,
        "--eval_split",
        "test",
        "--output_dir",
        out,
        "--learning_rate",
        "1e-3",
        "--warmup_ratio",
        "0.1",
        "--per_device_train_batch_size",
        "16",
        "--num_train_epochs",
        "2",
        "--logging_steps",
        "8",
        "--eval_steps",
        "16",
        "--save_steps",
        "0",
        "--seed",
        "3",
    )
    return out


def test_learns_synthetic_preference(trained, metrics, tiny_model, synthetic_data):
    evals = [m for m in metrics(trained) if "eval/accuracy" in m]
    assert evals[-1]["step"] == 32 and evals[-1]["eval/accuracy"] >= 0.9, evals
    # ... and an untrained head on the same model is near chance on these held-out pairs
    model, tok = load_fresh(tiny_model, seed=3)
    ex = rm.tokenize_pairs(
        rm.to_reward_pairs(rm.load_split(synthetic_data, None, "test")), tok, 512, None, "test"
    )
    batch = rm.collate_reward_pairs(ex, tok.pad_token_id)
    with torch.no_grad():
        r = rm.sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
    baseline = (r[: len(ex)] > r[len(ex) :]).float().mean().item()
    assert 0.2 < baseline < 0.8, baseline
    print(f"held-out accuracy {evals[-1]['eval/accuracy']:.3f} (untrained {baseline:.3f})")


def test_outputs_metrics_and_reward_stats(trained, metrics):
    out = Path(trained)
    assert json.loads((out / "args.json").read_text())["eval_split"] == "test"
    rows = metrics(out)
    train = [m for m in rows if "train/loss" in m]
    for name in (
        "train/loss",
        "train/accuracy",
        "train/margin",
        "train/lr",
        "train/tokens_per_second",
    ):
        assert all(math.isfinite(m[name]) for m in train), name
    assert train[-1]["train/loss"] < train[0]["train/loss"]
    final = [m for m in rows if "eval/accuracy" in m][-1]
    for name in (
        "eval/accuracy",
        "eval/reward_chosen",
        "eval/reward_rejected",
        "eval/reward_std",
        "eval/loss",
    ):
        assert math.isfinite(final[name]), name
    assert final["eval/reward_chosen"] > final["eval/reward_rejected"]
    config = json.loads((out / "config.json").read_text())
    assert config["reward_mean"] == pytest.approx(final["eval/reward_mean"])
    assert (
        config["reward_std"] == pytest.approx(final["eval/reward_std"]) and config["reward_std"] > 0
    )
    assert config["pad_token_id"] is not None and len(config["id2label"]) == 1
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval/accuracy"] == final["eval/accuracy"] and results["num_pairs"] == 128
    assert not any(
        k for k, v in config.items() if "drop" in k and isinstance(v, float) and v != 0.0
    )


def test_plain_transformers_load_gives_the_same_score(trained, synthetic_data):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(trained).eval()
    tok = AutoTokenizer.from_pretrained(trained)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id and model.config.num_labels == 1
    ex = rm.tokenize_pairs(
        rm.to_reward_pairs(rm.load_split(synthetic_data, None, "test")), tok, 512, None, "test"
    )
    ids = torch.tensor([ex[0]["chosen_ids"]])  # one unpadded sequence, ending in EOS
    with torch.no_grad():
        hf = model(input_ids=ids).logits[0, 0]
        ours = rm.sequence_rewards(model, ids, torch.ones_like(ids))[0]
    assert abs(hf.item() - ours.item()) <= 1e-6, (hf, ours)
    assert model.config.reward_std > 0


def test_eval_only_reproduces_final_eval(trained, synthetic_data, metrics, run_script, tmp_path):
    """--eval_only writes eval_results.json only: no args.json or metrics.jsonl that could be mistaken
    for (or, in the model's own directory, overwrite) a training run's."""
    out = tmp_path / "eval"
    run_script(
        "reward_model.py",
        "--eval_only",
        "--model_name_or_path",
        trained,
        "--dataset_name",
        synthetic_data,
        "--eval_split",
        "test",
        "--output_dir",
        out,
    )
    final = [m for m in metrics(trained) if "eval/accuracy" in m][-1]
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval/accuracy"] == final["eval/accuracy"] and results["split"] == "test"
    for name in ("eval/reward_chosen", "eval/reward_rejected", "eval/reward_std"):
        assert results[name] == pytest.approx(final[name], abs=1e-5), name
    assert sorted(p.name for p in out.iterdir()) == [
        "eval_results.json"
    ]  # nothing trained, saved or logged


def test_eval_only_never_overwrites_the_trained_run(trained, synthetic_data):
    """Review M3 / case 18: the docstring's own example scored the model into its own directory and
    replaced the training args.json. Now refused, before the model loads, and nothing changes."""
    before = {p.name: p.read_bytes() for p in Path(trained).iterdir() if p.is_file()}
    message = main_error(
        "reward_model.py",
        eval_only=True,
        model_name_or_path=str(trained),
        dataset_name=synthetic_data,
        eval_split="test",
        output_dir=str(trained),
    )
    assert "--eval_only writes eval_results.json" in message and "another --output_dir" in message
    assert {p.name: p.read_bytes() for p in Path(trained).iterdir() if p.is_file()} == before


def test_eval_only_refuses_a_causal_lm(tiny_model, synthetic_data, run_script, tmp_path):
    proc = run_script(
        "reward_model.py",
        "--eval_only",
        "--model_name_or_path",
        tiny_model,
        "--dataset_name",
        synthetic_data,
        "--eval_split",
        "test",
        "--output_dir",
        tmp_path / "e",
        check=False,
    )
    assert (
        proc.returncode != 0 and "no trained `score` head" in proc.stderr.strip().splitlines()[-1]
    )


# ---- 2 processes and resume ----


def _train(runner, model, data, out, per_device, *extra, **run_kwargs):
    return runner(
        "reward_model.py",
        "--model_name_or_path",
        model,
        "--dataset_name",
        data,
        "--output_dir",
        out,
        "--per_device_train_batch_size",
        per_device,
        "--per_device_eval_batch_size",
        "4",
        "--max_steps",
        "4",
        "--learning_rate",
        "1e-3",
        "--lr_scheduler",
        "linear",
        "--warmup_ratio",
        "0",
        "--logging_steps",
        "1",
        "--seed",
        "7",
        *extra,
        **run_kwargs,
    )


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model, synthetic_data, run_script):
    """A 1-process run (batch 4) that saves a checkpoint at step 2 of 4, on 24 pairs: 6 steps per epoch."""
    d = tmp_path_factory.mktemp("rm_ddp")
    data = d / "data"
    write_jsonl(data / "train.jsonl", synthetic_pairs(24, seed=5))
    write_jsonl(data / "test.jsonl", synthetic_pairs(6, seed=6))
    _train(run_script, tiny_model, data, d / "one", 4, "--save_steps", "2", "--eval_split", "test")
    return d, data


@pytest.fixture(scope="module")
def ddp_run(two_runs, tiny_model, run_accelerate):
    """The same 4 steps on 2 DDP processes (2 pairs each), the reference for the 1-process and ZeRO runs."""
    d, data = two_runs
    proc = _train(run_accelerate, tiny_model, data, d / "two", 2, "--eval_split", "test")
    assert proc.stdout.count("train: 24 pairs") == 2  # two processes really ran
    # and the main process's first line says so, with the global batch of one optimizer step (checked
    # as present: the other process's report can reach the shared pipe first)
    first = "2 processes (MULTI_CPU), device cpu, fp32, global batch 4 pairs (2 per device x 2 x 1"
    assert first in proc.stdout, proc.stdout[:300]
    return d / "two"


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_two_processes_match_one(two_runs, ddp_run, tiny_model, weights, metrics):
    d, _ = two_runs
    one, two = weights(d / "one"), weights(ddp_run)
    assert (
        max_diff(one, two) <= 1e-4
    )  # (a forward past the DDP wrapper would skip the gradient all-reduce)
    base = weights(tiny_model)
    assert any(
        (one[k] - base[k]).abs().max() > 1e-3 for k in one if k in base
    )  # training moved the weights
    ev1, ev2 = (
        [m for m in metrics(run) if "eval/accuracy" in m][-1] for run in (d / "one", ddp_run)
    )
    assert (
        ev1["eval/accuracy"] == ev2["eval/accuracy"]
    )  # 6 pairs over 2 processes: padding duplicates dropped
    assert ev1["eval/reward_mean"] == pytest.approx(ev2["eval/reward_mean"], abs=1e-4)
    t1, t2 = (
        [m["train/loss"] for m in metrics(run) if "train/loss" in m] for run in (d / "one", ddp_run)
    )
    assert t1 == pytest.approx(t2, abs=1e-4)


# Every ZeRO stage x precision (each launch ~5 CPU-seconds from the warm interpreter).
@pytest.mark.parametrize("stage,bf16", [(2, False), (2, True), (3, False), (3, True)])
def test_deepspeed_zero(
    stage, bf16, two_runs, ddp_run, tiny_model, run_deepspeed, weights, metrics, tmp_path
):
    """Every ZeRO stage and precision trains, checkpoints (JSON state, no pickled objects), exits 0 and
    saves a model that plain from_pretrained loads and that scores as the trained one did at its last
    eval; ZeRO-3 in fp32 ends where the DDP run with the same global batch and seed does. (The review
    saw ZeRO-3 bf16 abort at exit; it did not reproduce on f8cb464 nor here: 5 runs, each rc 0.)"""
    from transformers import AutoModelForSequenceClassification

    _, data = two_runs
    out = tmp_path / "out"
    _train(
        run_deepspeed,
        tiny_model,
        data,
        out,
        2,
        "--eval_split",
        "test",
        "--save_steps",
        "2",
        *(["--bf16"] if bf16 else []),
        stage=stage,
        bf16=bf16,
    )
    assert (
        json.loads((out / "checkpoints" / "step_2" / "step.json").read_text())["scheduler"][
            "last_epoch"
        ]
        == 2
    )
    assert not list((out / "checkpoints").rglob("custom_checkpoint_*"))
    model = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    tok = rm.load_tokenizer(_Args(str(out)))
    ex = rm.tokenize_pairs(
        rm.to_reward_pairs(rm.load_split(str(data), None, "test")), tok, 512, None, "test"
    )
    batch = rm.collate_reward_pairs(ex, tok.pad_token_id)
    with torch.no_grad():
        r = rm.sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
    final = [m for m in metrics(out) if "eval/accuracy" in m][-1]
    # bf16: the last eval ran under bf16 (DeepSpeed keeps bf16 weights), the reload in fp32
    assert r.mean().item() == pytest.approx(final["eval/reward_mean"], abs=0.05 if bf16 else 1e-5)
    assert json.loads((out / "config.json").read_text())["reward_mean"] == final["eval/reward_mean"]
    if stage == 3 and not bf16:
        assert max_diff(weights(out), weights(ddp_run)) <= 1e-4


def test_deepspeed_config_with_other_accumulation_is_refused(
    two_runs, tiny_model, run_deepspeed, monkeypatch, tmp_path
):
    _, data = two_runs
    monkeypatch.setenv(
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2"
    )  # what a DeepSpeed config sets
    proc = _train(
        run_deepspeed, tiny_model, data, tmp_path / "out", 2, stage=2, num_processes=1, check=False
    )
    assert proc.returncode != 0
    errors = {line for line in proc.stderr.splitlines() if line.startswith("error:")}
    assert len(errors) == 1 and "gradient_accumulation_steps=2" in errors.pop(), proc.stderr[-2000:]


def test_resume_matches_uninterrupted(two_runs, tiny_model, run_script, weights, metrics):
    d, data = two_runs
    assert (d / "one" / "checkpoints" / "step_2" / "step.json").exists()
    resumed = d / "resumed"
    shutil.copytree(
        d / "one" / "checkpoints", resumed / "checkpoints"
    )  # as if 'one' had been killed after step 2
    proc = _train(
        run_script,
        tiny_model,
        data,
        resumed,
        4,
        "--eval_split",
        "test",
        "--resume_from_checkpoint",
        "latest",
    )
    assert "resumed from" in proc.stdout + proc.stderr
    full, res = weights(d / "one"), weights(resumed)
    for k in full:
        assert (full[k] - res[k]).abs().max().item() <= 1e-6, k
    assert [m["step"] for m in metrics(resumed) if "train/loss" in m] == [3, 4]

    def timeless(row):  # 6 steps per epoch: the resume from step 2 starts mid-epoch
        return {k: v for k, v in row.items() if not k.endswith("_per_second")}

    after = [m for m in metrics(d / "one") if m["step"] > 2]
    for a, b in zip(after, metrics(resumed), strict=True):
        assert timeless(b) == pytest.approx(timeless(a), abs=1e-6)
    assert json.loads((resumed / "config.json").read_text())["reward_mean"] == pytest.approx(
        json.loads((d / "one" / "config.json").read_text())["reward_mean"], abs=1e-5
    )


def test_resume_state_is_json_not_pickle(two_runs):
    """The scheduler is saved in step.json; nothing of ours is pickled (accelerate's
    custom_checkpoint_*.pkl unpickles with weights_only=False)."""
    d, _ = two_runs
    ckpt = d / "one" / "checkpoints" / "step_2"
    assert json.loads((ckpt / "step.json").read_text())["scheduler"]["last_epoch"] == 2
    assert not list(ckpt.glob("custom_checkpoint_*"))


# ---- dtypes, dropout, ChatML, non-finite values ----


def _run(**kwargs):
    rm.main(
        rm.Args(**{"max_steps": 1, "save_steps": 0, "per_device_train_batch_size": 4, **kwargs})
    )


def test_bf16_checkpoint_trains_in_fp32(tiny_model_bf16, synthetic_data, weights, tmp_path):
    _run(
        model_name_or_path=tiny_model_bf16,
        dataset_name=synthetic_data,
        learning_rate=1e-5,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        per_device_train_batch_size=16,
        output_dir=str(tmp_path / "o"),
    )
    w0, w1 = weights(tiny_model_bf16), weights(tmp_path / "o")
    assert {w.dtype for w in w1.values()} == {torch.float32}
    # rows of input embeddings of tokens absent from the data get no gradient: count the rest
    trained = [k for k in w0 if "embed_tokens" not in k and k in w1]
    changed = sum((w1[k] != w0[k].float()).sum().item() for k in trained) / sum(
        w1[k].numel() for k in trained
    )
    assert changed > 0.9, changed  # in pure bf16 a 1e-5 step is below the weights' resolution


def test_dropout_disabled_including_attention_dropout(dropout_model):
    """The shared disable_dropout; a Llama reads attention_dropout=0.3 as a float."""
    model, tok = load_fresh(dropout_model)
    model.train()
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog").input_ids])
    with torch.no_grad():
        a, b = (rm.sequence_rewards(model, ids, torch.ones_like(ids)) for _ in range(2))
    assert torch.equal(a, b)
    assert model.config.attention_dropout == 0.0


def test_chatml_pairs_end_in_one_eos(chatml_model, tmp_path):
    """A ChatML template renders '<|im_end|>\n' after the answer; the pair must end in that
    single EOS (where generation stops and PPO reads the score), not in a second one."""
    tok = rm.load_tokenizer(_Args(chatml_model))
    user = [{"role": "user", "content": "What is 2 + 2?"}]
    rows = [
        {
            "prompt": user,
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}],
        },
        {"prompt": "Q: 2 + 2?\nA:", "chosen": " 4<|im_end|>", "rejected": " 5"},
    ]
    ex = [
        rm.tokenize_pairs(
            rm.to_reward_pairs(
                rm.load_split(write_jsonl(tmp_path / f"{i}.jsonl", [row]), None, "train")
            ),
            tok,
            512,
            None,
            "chatml",
        )[0]
        for i, row in enumerate(rows)
    ]  # one file per shape: a JSON column holds one type
    eos = tok.eos_token_id
    assert tok.convert_ids_to_tokens(eos) == "<|im_end|>"
    for e, row in zip(ex, rows):
        n_prompt = len(rm.encode_prompt(tok, row["prompt"]))
        for ids in (e["chosen_ids"], e["rejected_ids"]):
            assert ids[-1] == eos and ids[n_prompt:].count(eos) == 1, tok.convert_ids_to_tokens(ids)


def test_non_finite_loss_stops_before_the_weights_change(
    tiny_model, synthetic_data, monkeypatch, weights, tmp_path
):
    """A NaN loss at step 2 stops the run before the optimizer step: no NaN model, no NaN
    reward_mean/std, and the step-1 checkpoint stays finite."""
    calls, original = [], rm.reward_loss

    def nan_from_step_2(*a, **k):
        calls.append(1)
        loss = original(*a, **k)
        return loss * float("nan") if len(calls) >= 2 else loss

    monkeypatch.setattr(rm, "reward_loss", nan_from_step_2)
    out = tmp_path / "o"
    message = main_error(
        "reward_model.py",
        model_name_or_path=tiny_model,
        dataset_name=synthetic_data,
        max_steps=3,
        per_device_train_batch_size=4,
        save_steps=1,
        output_dir=str(out),
    )
    assert "non-finite train/loss at step 2" in message
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    assert not (out / "checkpoints" / "step_2").exists()
    assert all(torch.isfinite(w).all() for w in weights(out / "checkpoints" / "step_1").values())


def test_gradient_checkpointing_changes_nothing_and_stats_without_eval_split(
    tiny_model, synthetic_data, weights, tmp_path
):
    """The hook-based score_tokens under --gradient_checkpointing trains to the same weights; with no
    eval split, eval_results.json still holds the reward statistics (over the train responses)."""
    for gc in (False, True):
        _run(model_name_or_path=tiny_model, dataset_name=synthetic_data, max_steps=2,
             learning_rate=1e-3, gradient_checkpointing=gc, output_dir=str(tmp_path / str(gc)))  # fmt: skip
    a, b = weights(tmp_path / "False"), weights(tmp_path / "True")
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    results = json.loads((tmp_path / "True" / "eval_results.json").read_text())
    assert results["split"] == "train" and results["num_pairs"] == 256 and results["reward_std"] > 0
