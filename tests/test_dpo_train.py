"""dpo.py training: precomputed reference log-probs, learning, 2 processes vs 1, resume."""

import itertools
import json
import math
import shutil

import pytest
import torch
from conftest import build_tokenizer, save_tiny_model, write_jsonl
from transformers import AutoModelForCausalLM

import dpo

STATS = [
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
]


@pytest.mark.parametrize("separate_ref", [False, True])
def test_precomputed_reference_matches_live_reference_and_frees_it(
    separate_ref, tiny_model, data_files, run_script, metrics, weights, tmp_path
):
    common = [
        "--model_name_or_path",
        tiny_model,
        "--dataset_name",
        data_files["preference"],
        "--eval_split",
        "train[:5]",
        "--max_steps",
        4,
        "--per_device_train_batch_size",
        3,
        "--per_device_eval_batch_size",
        2,
        "--learning_rate",
        1e-3,
        "--logging_steps",
        1,
        "--eval_steps",
        2,
        "--save_steps",
        0,
        "--seed",
        2,
    ]
    if separate_ref:  # a reference that is not the initial policy: loaded, used once, then deleted
        ref = save_tiny_model("llama", build_tokenizer(pad=True), tmp_path / "ref", seed=1)
        common += ["--ref_model_name_or_path", ref]
    live = run_script("dpo.py", *common, "--output_dir", tmp_path / "live")
    pre = run_script("dpo.py", *common, "--precompute_ref_logps", "--output_dir", tmp_path / "pre")
    # By construction the precomputed run holds one model at a time: the reference runs and is freed
    # before the policy loads (dpo.main); the live run says nothing of the kind.
    assert "precomputed reference log-probs of 13 pairs" in pre.stdout
    assert "the reference model is freed before the policy loads" in pre.stdout
    assert "precomputed" not in live.stdout
    rows_live, rows_pre = metrics(tmp_path / "live"), metrics(tmp_path / "pre")
    assert len(rows_live) == len(rows_pre) == 4 + 3  # 4 train rows, evals at steps 0, 2, 4
    for a, b in zip(rows_live, rows_pre):
        assert a["step"] == b["step"]
        keys = [k for k in a if k.removeprefix("eval/").removeprefix("train/") in STATS]
        assert len(keys) == 7
        for k in keys:
            assert a[k] == pytest.approx(b[k], abs=1e-5), (a["step"], k)
    if separate_ref:
        assert (
            rows_live[0]["eval/rewards/margins"] != 0
        )  # a different reference gives non-zero rewards at step 0
    w1, w2 = weights(tmp_path / "live"), weights(tmp_path / "pre")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= 1e-5


def test_learns_the_preferred_responses(tiny_model, run_script, metrics, tmp_path):
    # Learnable preference: the chosen response always ends in "yes", the rejected one in "no".
    words = [
        "red",
        "blue",
        "green",
        "black",
        "white",
        "gold",
        "grey",
        "pink",
        "apple",
        "sky",
        "grass",
        "night",
        "snow",
        "sun",
        "stone",
        "rose",
    ]
    rows = [
        {"prompt": f"Q{i}: {w}?\nA:", "chosen": f" {w} is yes", "rejected": f" {w} is no"}
        for i, w in enumerate(words)
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    run_script(
        "dpo.py",
        "--model_name_or_path",
        tiny_model,
        "--dataset_name",
        data,
        "--eval_split",
        "train",
        "--max_steps",
        16,
        "--per_device_train_batch_size",
        4,
        "--learning_rate",
        3e-4,
        "--beta",
        0.1,
        "--lr_scheduler",
        "constant",
        "--warmup_ratio",
        0,
        "--logging_steps",
        4,
        "--eval_steps",
        4,
        "--save_steps",
        0,
        "--precompute_ref_logps",
        "--output_dir",
        out,
    )
    evals = [
        r for r in metrics(out) if "eval/loss" in r
    ]  # eval_split = train: accuracy on the training pairs
    acc, margins = (
        [r["eval/rewards/accuracies"] for r in evals],
        [r["eval/rewards/margins"] for r in evals],
    )
    print("accuracies", acc, "margins", margins)
    assert (
        evals[0]["step"] == 0 and acc[0] == 0.0 and margins[0] == 0.0
    )  # policy = reference: every margin 0
    assert acc[-1] >= 0.9, acc
    # the margins grow at every eval
    assert all(b > a for a, b in itertools.pairwise(margins)), margins


def test_two_processes_match_one_process(
    tiny_model, data_files, run_script, run_accelerate, weights, tmp_path
):
    common = [
        "--model_name_or_path",
        tiny_model,
        "--dataset_name",
        data_files["preference"],
        "--max_steps",
        4,
        "--learning_rate",
        1e-3,
        "--save_steps",
        0,
        "--logging_steps",
        1,
        "--seed",
        3,
        "--per_device_eval_batch_size",
        3,
    ]
    run_script(
        "dpo.py", *common, "--per_device_train_batch_size", 4, "--output_dir", tmp_path / "one"
    )
    # 2 x 2 pairs per step; the 2-process run also precomputes its reference log-probs, each process a share
    run_accelerate(
        "dpo.py",
        *common,
        "--per_device_train_batch_size",
        2,
        "--precompute_ref_logps",
        "--output_dir",
        tmp_path / "two",
    )
    w1, w2, w0 = weights(tmp_path / "one"), weights(tmp_path / "two"), weights(tiny_model)
    assert w1.keys() == w2.keys()
    assert max((w1[k] - w0[k]).abs().max().item() for k in w1) > 1e-3  # the runs trained
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert diff <= 1e-4, diff


def test_resume_matches_uninterrupted_run(
    tiny_model, data_files, run_script, weights, metrics, tmp_path
):
    common = [
        "--model_name_or_path",
        tiny_model,
        "--dataset_name",
        data_files["preference"],
        "--max_steps",
        6,
        "--per_device_train_batch_size",
        3,
        "--learning_rate",
        1e-3,
        "--save_steps",
        2,
        "--logging_steps",
        1,
        "--seed",
        5,
    ]
    full = tmp_path / "full"
    run_script("dpo.py", *common, "--output_dir", full)
    # a run killed after step 4: its last complete checkpoint, plus a half-written one that must be ignored
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step_4", resumed / "checkpoints" / "step_4")
    (resumed / "checkpoints" / "step_5.tmp").mkdir()
    proc = run_script(
        "dpo.py", *common, "--output_dir", resumed, "--resume_from_checkpoint", "latest"
    )
    assert "resumed from" in proc.stdout + proc.stderr
    # 8 pairs, 3 per step: 3 steps per epoch, so the resume from step 4 starts mid-epoch
    assert [r["step"] for r in metrics(resumed)] == [5, 6]
    w1, w2 = weights(full), weights(resumed)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= 1e-6
    epoch = next(r["epoch"] for r in metrics(full) if r["step"] == 4 and "epoch" in r)
    assert epoch == pytest.approx(4 / 3)  # the checkpoint is one step into the second epoch

    def timeless(row):
        return {k: v for k, v in row.items() if not k.endswith("_per_second")}

    for a, b in zip(metrics(full)[4:], metrics(resumed), strict=True):
        assert timeless(b) == pytest.approx(timeless(a), abs=1e-6)


# ---- DeepSpeed ZeRO-2/3 on 2 CPU processes, fp32 and bf16 ----


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A reward model as reward_model.py saves it (Llama backbone, one output), the policy's vocabulary."""
    from conftest import build_config
    from transformers import AutoModelForSequenceClassification

    tok = build_tokenizer(pad=True)
    config = build_config("llama", tok)
    config.num_labels = 1
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rm") / "rm"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def zero_args(mode, tiny_model, data_files, reward_model_dir):
    common = [
        "--model_name_or_path",
        tiny_model,
        "--max_steps",
        2,
        "--per_device_train_batch_size",
        2,
        "--per_device_eval_batch_size",
        2,
        "--learning_rate",
        1e-3,
        "--logging_steps",
        1,
        "--save_steps",
        0,
        "--seed",
        3,
        "--eval_split",
        "train[:4]",
        "--warmup_ratio",
        0,
    ]
    if (
        mode == "iter"
    ):  # one DPO-Iter iteration: sampling, the reward model, the reference, all under ZeRO
        return common + [
            "--dataset_name",
            data_files["prompts"],
            "--reward_model_name_or_path",
            reward_model_dir,
            "--samples_per_prompt",
            2,
            "--max_new_tokens",
            4,
        ]
    return (
        common
        + ["--dataset_name", data_files["preference"]]
        + (["--precompute_ref_logps"] if mode == "pre" else [])
    )


@pytest.fixture(scope="module")
def ddp_dpo_run(tiny_model, data_files, reward_model_dir, run_accelerate, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_dpo") / "out"
    run_accelerate(
        "dpo.py", *zero_args("live", tiny_model, data_files, reward_model_dir), "--output_dir", out
    )
    return out


# Every mode x ZeRO stage x precision (each launch ~5 CPU-seconds from the warm interpreter).
@pytest.mark.parametrize("mode", ["live", "pre", "iter"])
@pytest.mark.parametrize("stage,bf16", [(2, False), (2, True), (3, False), (3, True)])
def test_deepspeed_zero(
    stage,
    bf16,
    mode,
    tiny_model,
    data_files,
    reward_model_dir,
    ddp_dpo_run,
    run_deepspeed,
    weights,
    metrics,
    tmp_path,
):
    """Live reference, precomputed reference and one DPO-Iter iteration run under every ZeRO stage and
    precision (frozen reference and reward model through DeepSpeed inference engines under ZeRO-3) and save
    a model that plain from_pretrained loads; in fp32, ZeRO-3 ends where the 2-process DDP run does."""
    out = tmp_path / "out"
    run_deepspeed(
        "dpo.py",
        *zero_args(mode, tiny_model, data_files, reward_model_dir),
        "--output_dir",
        out,
        *(["--bf16"] if bf16 else []),
        stage=stage,
        bf16=bf16,
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    # fp32: the policy trains and is saved in float32. DeepSpeed bf16 keeps the module in bf16 (its fp32
    # master weights live in the optimizer) and saves that.
    assert next(model.parameters()).dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    evals = [r for r in metrics(out) if "eval/rewards/margins" in r]
    assert len(evals) == 2 and all(math.isfinite(r["eval/loss"]) for r in evals)
    # the reference is the policy's checkpoint in the policy's dtype (DeepSpeed's bf16 casts the
    # policy's module to bf16, and the reference loads in bf16): step-0 margins exactly 0
    assert evals[0]["eval/rewards/margins"] == 0.0
    if mode == "iter":
        assert json.loads((out / "iter_1" / "iteration.json").read_text())["pairs"] > 0
    if stage == 3 and not bf16 and mode != "iter":
        w, w_ddp = weights(out), weights(ddp_dpo_run)
        assert max((w[k] - w_ddp[k]).abs().max().item() for k in w) <= 1e-4


def test_deepspeed_config_with_other_accumulation_is_refused(
    tiny_model, data_files, run_deepspeed, monkeypatch, tmp_path
):
    monkeypatch.setenv(
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2"
    )  # what a DeepSpeed config sets
    proc = run_deepspeed(
        "dpo.py",
        "--model_name_or_path",
        tiny_model,
        "--dataset_name",
        data_files["preference"],
        "--max_steps",
        1,
        "--per_device_train_batch_size",
        1,
        "--output_dir",
        tmp_path / "out",
        stage=2,
        num_processes=1,  # the refusal comes before any sharding: one process is enough
        check=False,
    )
    assert proc.returncode != 0
    errors = {line for line in proc.stderr.splitlines() if line.startswith("error:")}
    assert len(errors) == 1 and "gradient_accumulation_steps=2" in errors.pop(), proc.stderr[-2000:]


@pytest.mark.parametrize("mode", ["live", "pre", "iter"])
def test_bf16_step0_is_an_exact_identity(
    mode, fresh_accelerator_state, tiny_model, data_files, metrics, tmp_path
):
    """--bf16 autocasts a float32 policy; its reference, the same checkpoint, loads in float32 too
    (a bf16 copy gave step-0 margins of ~2e-4 and accuracy 0.4): before any update the two give the
    same log-probs, every reward exactly 0, in the step-0 eval and in each first step's (pre-update)
    train statistics: live and precomputed reference, and DPO-Iter's iteration 2, whose reference
    is iteration 1's policy. In-process, one step per iteration."""
    (tmp_path / "r.py").write_text("def score(p, c):\n    return [float(len(x)) for x in c]\n")
    iterate = {"reward_fn": f"{tmp_path / 'r.py'}:score", "iterations": 2, "samples_per_prompt": 2}
    out = tmp_path / "out"
    dpo.main(
        dpo.Args(
            model_name_or_path=tiny_model,
            dataset_name=data_files["prompts" if mode == "iter" else "preference"],
            train_split="train[:4]" if mode == "iter" else "train",
            eval_split="train[:5]",
            max_steps=1,
            per_device_train_batch_size=3,
            per_device_eval_batch_size=2,
            max_new_tokens=4,
            logging_steps=1,
            save_steps=0,
            bf16=True,
            precompute_ref_logps=mode == "pre",
            output_dir=str(out),
            **(iterate if mode == "iter" else {}),
        )
    )
    rows = metrics(out)
    start_eval = next(r for r in rows if "eval/loss" in r)
    firsts = [r for r in rows if "train/loss" in r]  # one step per iteration: pre-update
    assert start_eval["step"] == 0 and len(firsts) == (2 if mode == "iter" else 1)
    for row, prefix in ((start_eval, "eval/"), *((r, "") for r in firsts)):
        rewards = [row[f"{prefix}rewards/{k}"] for k in ("chosen", "rejected", "margins")]
        assert rewards == [0.0, 0.0, 0.0] and row[f"{prefix}rewards/accuracies"] == 0.0, row


def test_bf16_checkpoint_trains_in_float32(tiny_model_bf16, data_files, weights, tmp_path):
    """transformers 5 keeps a checkpoint's dtype unless asked: the policy must load in float32, or one AdamW
    step at lr 1e-5 moves only ~13% of the bf16 weights. In-process, one step."""
    out = tmp_path / "out"
    dpo.main(
        dpo.Args(
            model_name_or_path=tiny_model_bf16,
            dataset_name=data_files["preference"],
            max_steps=1,
            per_device_train_batch_size=4,
            learning_rate=1e-5,
            warmup_ratio=0,
            lr_scheduler="constant",
            save_steps=0,
            eval_on_start=False,
            output_dir=str(out),
        )
    )
    w, w0 = weights(out), weights(tiny_model_bf16)
    assert all(t.dtype == torch.float32 for t in w.values())
    # (the input embedding rows of tokens absent from the batch get no gradient, so they are left out)
    changed = (
        torch.cat([(w[k] != w0[k].float()).flatten() for k in w if "embed" not in k])
        .float()
        .mean()
        .item()
    )
    assert changed > 0.9, changed


def test_processes_sample_with_their_own_noise(tiny_model, run_accelerate, tmp_path):
    """Two processes given identical prompts draw different DPO-Iter samples (seed + 100003 x rank)."""
    data = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "Q: hi\nA:"}] * 2)
    (
        tmp_path / "r.py"
    ).write_text(  # records what each process sampled; distinct scores, so no ties
        "import json, os\n"
        "def score(prompts, completions):\n"
        f"    with open(os.path.join({str(tmp_path)!r}, f'samples_{{os.getpid()}}.json'), 'w') as f:\n"
        "        json.dump(completions, f)\n"
        "    return [float(i) for i in range(len(completions))]\n"
    )
    run_accelerate(
        "dpo.py",
        "--model_name_or_path",
        tiny_model,
        "--dataset_name",
        data,
        "--reward_fn",
        f"{tmp_path / 'r.py'}:score",
        "--samples_per_prompt",
        2,
        "--max_new_tokens",
        8,
        "--max_steps",
        1,
        "--per_device_train_batch_size",
        1,
        "--output_dir",
        tmp_path / "out",
    )
    samples = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("samples_*.json"))]
    assert (
        len(samples) == 2 and len(samples[0]) == len(samples[1]) == 2
    )  # one prompt per process, 2 samples
    assert samples[0] != samples[1]
