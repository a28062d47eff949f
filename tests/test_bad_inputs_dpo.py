"""dpo.py: every bad input a user can give gets one `error:` line (docs/design.md section 4).

The table runs main(Args(...)) in-process (main_error: no 4-second subprocess start); the command
line's own paths (no arguments, --help) run as subprocesses once each. The case names follow the
dpo.py table of reviews/bad-inputs-and-newcomer.md (#N) where they come from it."""

import math

import pytest
import torch
from conftest import assert_one_line_error, main_error, tyro_help, write_jsonl

import dpo

PREF = [
    {"prompt": f"Q: {q}?\nA:", "chosen": f" {a}.", "rejected": " I do not know."}
    for q, a in [("one", "1"), ("two", "2"), ("six", "6"), ("ten", "10")]
]

DATA = {
    "pref": PREF,
    "prompts": [{"prompt": r["prompt"]} for r in PREF],
    "no_rejected": [{"prompt": "hi", "chosen": "a"}],
    "list_responses": [{"prompt": "hi", "chosen": ["a", "b"], "rejected": ["c"]}],
    "null_chosen": PREF[:2] + [{"prompt": "hi", "chosen": None, "rejected": "b"}],
    "nan_rejected": [{"prompt": "hi", "chosen": "a", "rejected": math.nan}],
    "empty_strings": [{"prompt": "", "chosen": "", "rejected": ""}] * 3,
    "identical": [
        {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["chosen"]} for r in PREF
    ],
    "messages_str": [{"messages": "hello"}],
    "saferlhf_partial": [{"prompt": "a", "response_0": "b", "response_1": "c"}],
}

REWARD_FNS = """
def nan(prompts, completions):
    return [float("nan")] * len(completions)
def strings(prompts, completions):
    return ["good"] * len(completions)
def short(prompts, completions):
    return [0.0] * (len(completions) - 1)
def constant(prompts, completions):
    return [1.0] * len(completions)
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo_bad")
    paths = {name: write_jsonl(d / f"{name}.jsonl", rows) for name, rows in DATA.items()}
    (d / "empty.jsonl").write_text("")
    paths["empty"] = str(d / "empty.jsonl")
    (d / "malformed.jsonl").write_text('{"prompt": "a", "chosen": \n')
    paths["malformed"] = str(d / "malformed.jsonl")
    (d / "rf.py").write_text(REWARD_FNS)
    (d / "broken.py").write_text("import no_such_module_anywhere\n")
    paths["rf"], paths["broken"] = str(d / "rf.py"), str(d / "broken.py")
    (d / "only_valid").mkdir()
    write_jsonl(d / "only_valid" / "mydata.jsonl", PREF)
    paths["dir"] = str(d)
    return paths


@pytest.fixture(scope="module")
def finished_run(tiny_model, files, tmp_path_factory):
    """An output_dir holding a finished 1-step run."""
    out = tmp_path_factory.mktemp("dpo_done") / "out"
    dpo.main(
        dpo.Args(
            model_name_or_path=tiny_model,
            dataset_name=files["pref"],
            max_steps=1,
            per_device_train_batch_size=2,
            save_steps=0,
            output_dir=str(out),
        )
    )
    return out


ITER = {
    "dataset_name": "{prompts}",
    "samples_per_prompt": 2,
    "max_new_tokens": 3,
    "generation_batch_size": 4,
}

# (case, Args overrides with {name}/{model}/{done} placeholders, needles of the error line)
CASES = [
    (
        "#1 missing model path",
        {"model_name_or_path": "{dir}/no_model"},
        ["no_model: no such directory"],
    ),
    ("#2 missing dataset file", {"dataset_name": "{dir}/missing.jsonl"}, ["no such file"]),
    ("#3 empty file", {"dataset_name": "{empty}"}, ["no data"]),
    ("#4 malformed JSON", {"dataset_name": "{malformed}"}, ["cannot load split 'train'"]),
    (
        "#5 missing rejected column",
        {"dataset_name": "{no_rejected}"},
        ["['chosen', 'prompt']", "prompt+chosen+rejected"],
    ),
    (
        "#6 lists of str as responses",
        {"dataset_name": "{list_responses}"},
        ["row 0, column 'chosen'", "list"],
    ),
    ("#7 one null chosen", {"dataset_name": "{null_chosen}"}, ["row 2, column 'chosen'", "None"]),
    ("NaN rejected", {"dataset_name": "{nan_rejected}"}, ["row 0, column 'rejected'", "nan"]),
    (
        "#8 empty strings",
        {"dataset_name": "{empty_strings}"},
        ["chosen and rejected responses are identical"],
    ),
    (
        "#9 chosen identical to rejected",
        {"dataset_name": "{identical}"},
        ["identical", "nothing to learn"],
    ),
    ("#10 every prompt exceeds max_length", {"max_length": 4}, ["no pair left", "max_length=4"]),
    ("#11 negative beta", {"beta": -0.1}, ["--beta must be > 0"]),
    (
        "#12 label_smoothing 0.7",
        {"label_smoothing": 0.7},
        ["--label_smoothing must be in [0, 0.5)"],
    ),
    ("label smoothing with ipo", {"loss_type": "ipo", "label_smoothing": 0.1}, ["not to ipo"]),
    (
        "#13 iterations without a labeller",
        {"iterations": 3},
        ["needs --reward_model_name_or_path or --reward_fn"],
    ),
    (
        "#14 reward model and reward fn",
        {"reward_fn": "{rf}:nan", "reward_model_name_or_path": "{model}"},
        ["not both"],
    ),
    ("#15 reward fn returns NaN", {**ITER, "reward_fn": "{rf}:nan"}, ["non-finite score (nan)"]),
    (
        "#16 reward fn without :function",
        {**ITER, "reward_fn": "{rf}"},
        ["expected 'path/to/file.py:function'"],
    ),
    (
        "#17 reward file raises ImportError",
        {**ITER, "reward_fn": "{broken}:f"},
        ["cannot import", "ModuleNotFound"],
    ),
    (
        "#18 reward fn returns strings",
        {**ITER, "reward_fn": "{rf}:strings"},
        ["must return a list of numbers"],
    ),
    (
        "#19 reward fn returns n-1 scores",
        {**ITER, "reward_fn": "{rf}:short"},
        ["returned 7 scores for 8 completions"],
    ),
    (
        "every sample ties",
        {**ITER, "reward_fn": "{rf}:constant"},
        ["same score", "no preference pair"],
    ),
    (
        "#20 reward model is a causal LM",
        {**ITER, "reward_model_name_or_path": "{model}"},
        ["is not a reward model"],
    ),
    (
        "#21 missing reward model",
        {**ITER, "reward_model_name_or_path": "{dir}/rm"},
        ["reward model", "no such directory"],
    ),
    ("#23 negative learning rate", {"learning_rate": -1e-3}, ["--learning_rate must be > 0"]),
    ("#24 eval_only without eval_split", {"eval_only": True}, ["needs --eval_split"]),
    (
        "#25 gradient_accumulation_steps 0",
        {"gradient_accumulation_steps": 0},
        ["--gradient_accumulation_steps must be >= 1"],
    ),
    (
        "#27 directory without a train file",
        {"dataset_name": "{dir}/only_valid"},
        ["cannot load split 'train'"],
    ),
    (
        "messages is a string (DPO-Iter)",
        {**ITER, "dataset_name": "{messages_str}", "reward_fn": "{rf}:nan"},
        ["row 0, column 'messages'", "str"],
    ),
    ("SafeRLHF-style rows", {"dataset_name": "{saferlhf_partial}"}, ["python prepare_data.py"]),
    ("logging_steps 0", {"logging_steps": 0}, ["--logging_steps must be >= 1"]),
    ("eval_steps 0", {"eval_steps": 0}, ["--eval_steps must be >= 1"]),
    ("max_prompt_length 0", {"max_prompt_length": 0}, ["--max_prompt_length must be >= 1"]),
    (
        "missing_eos_penalty NaN",
        {"missing_eos_penalty": math.nan},
        ["--missing_eos_penalty must be a finite"],
    ),
    (
        "accumulation larger than the data",
        {"gradient_accumulation_steps": 8},
        ["make no full step"],
    ),
    (
        "tensorboard not installed",
        {"report_to": "tensorboard"},
        ["tensorboard: the package is not installed"],
    ),
    (
        "output_dir holds a finished run",
        {"output_dir": "{done}"},
        ["already holds a run", "--overwrite_output_dir"],
    ),
    (
        "resume latest with no checkpoint",
        {"resume_from_checkpoint": "latest"},
        ["no checkpoint in"],
    ),
    (
        "DPO-Iter resume with no iteration",
        {**ITER, "reward_fn": "{rf}:nan", "resume_from_checkpoint": "latest"},
        ["no complete DPO-Iter iteration"],
    ),
    (
        "resume from a path that is no checkpoint",
        {"output_dir": "{done}", "resume_from_checkpoint": "{done}"},
        ["no step.json"],
    ),
]


@pytest.mark.parametrize("case,overrides,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(
    case, overrides, needles, tiny_model, files, finished_run, tmp_path
):
    places = {**files, "model": tiny_model, "done": str(finished_run)}
    kwargs = {
        "model_name_or_path": tiny_model,
        "dataset_name": files["pref"],
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "save_steps": 0,
        "output_dir": str(tmp_path / "out"),
    }
    kwargs.update(
        {k: v.format(**places) if isinstance(v, str) else v for k, v in overrides.items()}
    )
    message = main_error("dpo.py", **kwargs)
    for needle in needles:
        assert needle in message, message
    assert not (tmp_path / "out" / "iter_1").exists()  # no pairs built, nothing trained on
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_non_finite_loss_stops_before_the_step(tiny_model, files, monkeypatch, tmp_path):
    """A NaN loss (injected into the loss function) stops the run with one line before the optimizer
    step: no model is saved, and the checkpoint of the last good step stays as it was."""
    real = dpo.dpo_loss
    calls = {"n": 0}

    def nan_after_two_steps(*args, **kwargs):
        losses, chosen, rejected = real(*args, **kwargs)
        calls["n"] += 1
        return (losses * float("nan") if calls["n"] > 2 else losses), chosen, rejected

    monkeypatch.setattr(dpo, "dpo_loss", nan_after_two_steps)
    message = main_error(
        "dpo.py",
        model_name_or_path=tiny_model,
        dataset_name=files["pref"],
        max_steps=4,
        per_device_train_batch_size=2,
        save_steps=2,
        learning_rate=1e-3,
        output_dir=str(tmp_path / "out"),
        eval_on_start=False,
    )
    assert "non-finite train/loss at step 3" in message
    out = tmp_path / "out"
    assert not (out / "model.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2"]
    from safetensors.torch import load_file

    weights = load_file(str(out / "checkpoints" / "step_2" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_command_line_no_arguments_and_help(run_script, capsys):
    # offline, the hub defaults cannot load: one line, not a traceback
    assert_one_line_error(
        run_script("dpo.py", check=False), "cannot load a tokenizer", "pythia-160m"
    )
    help_text = tyro_help(dpo.Args, capsys)
    assert "DPO / IPO / conservative DPO on preference pairs, or DPO-Iter" in help_text
    assert "python dpo.py --model_name_or_path path/to/sft --dataset_name pairs.jsonl" in help_text
    for beyond in (
        "best-vs-worst of k is our choice, beyond the paper",
        "SUMMED log-probs (TRL length-averages",
    ):
        assert beyond in help_text
