"""ppo.py's bad-input table (docs/design.md section 4): each bad input gives one `error:` line, in
process (main(Args(...)) raising the DataError the command line prints), before any model loads
where the input can be judged without one; none leaves a saved model behind."""

import json
import math
from pathlib import Path

import pytest
from conftest import main_error, tyro_help, write_jsonl

import ppo

REWARDS = """
import math


def count_bang(prompts, completions):
    return [float(c.count("!")) for c in completions]


def nan(prompts, completions):
    return [math.nan] * len(completions)


def inf(prompts, completions):
    return [math.inf] * len(completions)


def strings(prompts, completions):
    return ["good"] * len(completions)


def scalar(prompts, completions):
    return 1.0


def wrong_length(prompts, completions):
    return [1.0] * (len(completions) + 1)


not_callable = 3
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_models, data_files):
    d = tmp_path_factory.mktemp("bad_ppo")
    (d / "rewards.py").write_text(REWARDS)
    (d / "import_error.py").write_text("import no_such_package_here\n")
    (d / "syntax_error.py").write_text("def f(:\n")
    (d / "empty.jsonl").write_text("")
    (d / "malformed.jsonl").write_text('{"prompt": "a"\n{oops\n')
    (d / "a_file").write_text("not a directory")
    (d / "nan.jsonl").write_text('{"prompt": NaN}\n' + '{"prompt": "hi"}\n' * 7)
    # a third-party reward model: a classifier config without reward_model.py's statistics
    config = json.loads((Path(tiny_models["llama"]) / "config.json").read_text())
    config.update(architectures=["LlamaForSequenceClassification"], num_labels=1)
    config.pop("id2label", None), config.pop("label2id", None)
    (d / "rm_no_stats").mkdir()
    (d / "rm_no_stats" / "config.json").write_text(json.dumps(config))
    return {
        "dir": d,
        "model": tiny_models["llama"],
        "prompts": data_files["prompts"],
        "rf": str(d / "rewards.py"),
        "int": write_jsonl(d / "int.jsonl", [{"prompt": 3}] * 8),
        "null": write_jsonl(d / "null.jsonl", [{"prompt": None}] + [{"prompt": "hi"}] * 7),
        "nan": str(d / "nan.jsonl"),
        "empty_prompts": write_jsonl(d / "empty_prompts.jsonl", [{"prompt": ""}] * 8),
        "list_of_numbers": write_jsonl(d / "numbers.jsonl", [{"prompt": [1, 2]}] * 8),
        "text": write_jsonl(d / "text.jsonl", [{"text": "hi"}] * 8),
    }


def base(f, out) -> dict:
    """A valid tiny run: 4 prompts x 1 sample, one minibatch, 4 new tokens, one iteration."""
    return dict(  # noqa: C408
        model_name_or_path=f["model"], dataset_name=f["prompts"], output_dir=str(out),
                reward_fn=f"{f['rf']}:count_bang", per_device_prompt_batch_size=4, samples_per_prompt=1,
                num_minibatches=1, per_device_train_batch_size=4, local_rollout_forward_batch_size=4,
                max_new_tokens=4, top_k=0, num_iterations=1)  # fmt: skip


def reused(f, out):
    out.mkdir()
    (out / "args.json").write_text(json.dumps({"seed": 1}))
    return {}


def leftover_tmp(f, out):
    (out / "checkpoints" / "step_2.tmp").mkdir(parents=True)
    return {"resume_from_checkpoint": "latest"}


def corrupt_checkpoint(f, out):
    ckpt = out / "checkpoints" / "step_1"
    ckpt.mkdir(parents=True)
    (ckpt / "step.json").write_text(json.dumps({"step": 1}))
    (ckpt / "model.safetensors").write_text("truncated")
    return {"resume_from_checkpoint": "latest"}


def different_args(f, out):
    out.mkdir()
    (out / "args.json").write_text(
        json.dumps({**ppo.asdict(ppo.Args(**base(f, out))), "learning_rate": 1.0})
    )
    (out / "checkpoints" / "step_1").mkdir(parents=True)
    (out / "checkpoints" / "step_1" / "step.json").write_text(json.dumps({"step": 1}))
    return {"resume_from_checkpoint": "latest"}


# (id, extra Args or a function (files, output_dir) -> extra Args, a phrase the one error line holds)
CASES = [
    ("neither reward", {"reward_fn": None}, "exactly one of"),
    ("normalize_reward with a reward fn", {"normalize_reward": True}, "needs the reward_mean"),
    (
        "normalize_reward, no statistics in the config",
        lambda f, o: {
            "reward_fn": None,
            "normalize_reward": True,
            "reward_model_name_or_path": str(f["dir"] / "rm_no_stats"),
        },
        "rm_no_stats has none",
    ),
    ("both rewards", lambda f, o: {"reward_model_name_or_path": f["model"]}, "exactly one of"),
    (
        "reward file ImportError",
        lambda f, o: {"reward_fn": f"{f['dir']}/import_error.py:f"},
        "cannot import",
    ),
    (
        "reward file SyntaxError",
        lambda f, o: {"reward_fn": f"{f['dir']}/syntax_error.py:f"},
        "cannot import",
    ),
    (
        "reward fn without :function",
        lambda f, o: {"reward_fn": f["rf"]},
        "expected 'path/to/file.py:function'",
    ),
    ("reward fn missing file", {"reward_fn": "missing.py:f"}, "no such file"),
    (
        "reward fn not callable",
        lambda f, o: {"reward_fn": f"{f['rf']}:not_callable"},
        "no function",
    ),
    ("reward fn returns NaN", lambda f, o: {"reward_fn": f"{f['rf']}:nan"}, "non-finite score"),
    ("reward fn returns inf", lambda f, o: {"reward_fn": f"{f['rf']}:inf"}, "non-finite score"),
    (
        "reward fn returns strings",
        lambda f, o: {"reward_fn": f"{f['rf']}:strings"},
        "list of numbers",
    ),
    (
        "reward fn returns a scalar",
        lambda f, o: {"reward_fn": f"{f['rf']}:scalar"},
        "list of numbers",
    ),
    (
        "reward fn wrong length",
        lambda f, o: {"reward_fn": f"{f['rf']}:wrong_length"},
        "5 scores for 4",
    ),
    (
        "reward model is a causal LM",
        lambda f, o: {"reward_fn": None, "reward_model_name_or_path": f["model"]},
        "is not a reward model",
    ),
    (
        "nonexistent reward model",
        {"reward_fn": None, "reward_model_name_or_path": "/nonexistent/rm"},
        "no such directory",
    ),
    ("nonexistent model", {"model_name_or_path": "/nonexistent/model"}, "no such directory"),
    ("nonexistent dataset", {"dataset_name": "/nonexistent/prompts.jsonl"}, "no such file"),
    ("empty dataset file", lambda f, o: {"dataset_name": f"{f['dir']}/empty.jsonl"}, "no data"),
    ("malformed JSON", lambda f, o: {"dataset_name": f"{f['dir']}/malformed.jsonl"}, "cannot load"),
    ("no prompt column", lambda f, o: {"dataset_name": f["text"]}, "expected prompts"),
    ("prompt is an int", lambda f, o: {"dataset_name": f["int"]}, "row 0, column 'prompt'"),
    (
        "prompt is a list of numbers",
        lambda f, o: {"dataset_name": f["list_of_numbers"]},
        "column 'prompt'",
    ),
    ("prompt is null", lambda f, o: {"dataset_name": f["null"]}, "row 0, column 'prompt'"),
    ("prompt is NaN", lambda f, o: {"dataset_name": f["nan"]}, "row 0, column 'prompt'"),
    ("every prompt is empty", lambda f, o: {"dataset_name": f["empty_prompts"]}, "no prompts"),
    (
        "rollout not divisible",
        {"per_device_prompt_batch_size": 3, "num_minibatches": 2},
        "must split",
    ),
    ("num_minibatches 0", {"num_minibatches": 0}, ">= 1"),
    ("temperature 0", {"temperature": 0.0}, "temperature"),
    (
        "more prompts per batch than prompts",
        {"per_device_prompt_batch_size": 64},
        "no full iteration",
    ),
    ("max_prompt_length 0", {"max_prompt_length": 0}, "--max_prompt_length must be >= 1"),
    ("max_prompt_length negative", {"max_prompt_length": -3}, "--max_prompt_length must be >= 1"),
    ("eval_steps 0", {"eval_steps": 0}, "--eval_steps must be >= 1"),
    ("logging_steps 0", {"logging_steps": 0}, "--logging_steps must be >= 1"),
    ("negative learning rate", {"learning_rate": -1e-5}, "--learning_rate must be > 0"),
    (
        "zero critic learning rate",
        {"critic_learning_rate": 0.0},
        "--critic_learning_rate must be > 0",
    ),
    ("ref_ema above 1", {"ref_ema": 2.0}, "--ref_ema"),
    ("report_to without the package", {"report_to": "tensorboard"}, "not installed"),
    ("output_dir is a file", lambda f, o: {"output_dir": f"{f['dir']}/a_file"}, "is a file"),
    ("output_dir holds a run", reused, "already holds a run"),
    ("latest with no checkpoint", {"resume_from_checkpoint": "latest"}, "no checkpoint"),
    ("only a leftover .tmp checkpoint", leftover_tmp, "no checkpoint"),
    ("resume from a corrupt checkpoint", corrupt_checkpoint, "cannot resume"),
    ("resume with different arguments", different_args, "learning_rate"),
]


@pytest.mark.parametrize("name,extra,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(name, extra, needle, files, tmp_path):
    out = tmp_path / "out"
    kwargs = base(files, out)
    kwargs.update(extra(files, out) if callable(extra) else extra)
    message = main_error("ppo.py", **kwargs)
    assert needle in message, message
    assert not (out / "model.safetensors").exists()  # nothing saved


def test_non_finite_loss_stops_before_the_optimizer_step(files, tmp_path, monkeypatch):
    """A NaN loss (injected) stops the run before any weight changes: nothing is saved."""
    real = ppo.policy_loss

    def nan_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * math.nan, stats

    monkeypatch.setattr(ppo, "policy_loss", nan_loss)
    out = tmp_path / "out"
    assert "non-finite loss at step 1" in main_error("ppo.py", **base(files, out))
    assert not (out / "model.safetensors").exists()


def test_command_line_without_arguments_and_help(run_script, capsys):
    """No arguments, offline: one error line, no hub access; --help says what the script does, with an
    offline example."""
    from conftest import assert_one_line_error

    assert_one_line_error(run_script("ppo.py", check=False), "exactly one of")
    help_text = tyro_help(ppo.Args, capsys)
    assert (
        "PPO (RLHF): train an SFT policy" in help_text
        and "Offline example: python ppo.py" in help_text
    )
