"""sft.py: every bad input a user can give gets one `error:` line (docs/design.md section 4).

The table runs main(Args(...)) in-process (main_error: no 4-second subprocess start); the command
line's own paths (no arguments, --help) run as subprocesses once each."""

import math
import shutil

import pytest
from conftest import assert_one_line_error, main_error, tyro_help, write_jsonl

import sft

PC = [
    {"prompt": f"Q: {q}?\nA:", "completion": f" {a}."}
    for q, a in [("one", "1"), ("two", "2"), ("six", "6")]
]
MSG = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]

# name -> rows of a JSONL file (None: no file is written; the case names its own dataset_name)
DATA = {
    "pc": PC,
    "wrong_columns": [{"body": "hello"}],
    "no_completion": [{"prompt": "hello"}],
    "list_prompt": [{"prompt": ["a", "b"], "completion": " c"}],
    "int_completion": [{"prompt": "a", "completion": 3}],
    "null_completion": PC[:2] + [{"prompt": "a", "completion": None}],
    "nan_completion": [{"prompt": "a", "completion": math.nan}],
    "messages_str": [{"messages": "hello"}],
    "messages_nocontent": [{"messages": [{"role": "user", "text": "hi"}]}],
    "messages_no_assistant": [{"messages": [{"role": "user", "content": "hi"}]}],
    "empty_strings": [{"prompt": "", "completion": ""}] * 3,
    "pref_null": [{"prompt": "a", "chosen": None, "rejected": "b"}],
    "mixed_types": PC[:1] + [{"prompt": ["x", "y"], "completion": " c"}],
    "messages": [{"messages": MSG}] * 2,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("sft_bad")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = None
    tok.save_pretrained(d / "no_template")
    paths = {name: write_jsonl(d / f"{name}.jsonl", rows) for name, rows in DATA.items()}
    (d / "empty.jsonl").write_text("")
    paths["empty"] = str(d / "empty.jsonl")
    (d / "malformed.jsonl").write_text('{"prompt": "a", "completion": \n')
    paths["malformed"] = str(d / "malformed.jsonl")
    paths["dir"] = str(d)
    return paths


@pytest.fixture(scope="module")
def finished_run(tiny_model, files, tmp_path_factory):
    """An output_dir holding a finished 2-step run with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("sft_done") / "out"
    sft.main(
        sft.Args(
            model_name_or_path=tiny_model,
            dataset_name=files["pc"],
            max_steps=2,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=1,
            save_steps=1,
            output_dir=str(out),
        )
    )
    return out


# (case, Args overrides with {pc}/{dir}/{model}/{out}/{done} placeholders, needles of the error line)
CASES = [
    (
        "missing model path",
        {"model_name_or_path": "{dir}/no_model"},
        ["no_model: no such directory"],
    ),
    ("missing dataset file", {"dataset_name": "{dir}/missing.jsonl"}, ["no such file"]),
    (
        "dataset path typo, no extension",
        {"dataset_name": "{dir}/pc_typo"},
        ["pc_typo: no such file"],
    ),
    ("empty file", {"dataset_name": "{empty}"}, ["no data"]),
    ("malformed JSON", {"dataset_name": "{malformed}"}, ["cannot load split 'train'", "JSON"]),
    (
        "wrong columns",
        {"dataset_name": "{wrong_columns}"},
        ["['body']", "prompt+completion", "messages", "text"],
    ),
    ("missing completion column", {"dataset_name": "{no_completion}"}, ["['prompt']"]),
    (
        "prompt is a list of str",
        {"dataset_name": "{list_prompt}"},
        ["row 0, column 'prompt'", "list"],
    ),
    (
        "completion is an int",
        {"dataset_name": "{int_completion}"},
        ["row 0, column 'completion'", "int"],
    ),
    (
        "one null completion",
        {"dataset_name": "{null_completion}"},
        ["row 2, column 'completion'", "None"],
    ),
    ("NaN completion", {"dataset_name": "{nan_completion}"}, ["row 0, column 'completion'", "nan"]),
    ("null chosen in preference data", {"dataset_name": "{pref_null}"}, ["row 0, column 'chosen'"]),
    (
        "mixed types across rows",
        {"dataset_name": "{mixed_types}"},
        ["row 1, column 'prompt'", "list"],
    ),
    (
        "messages, tokenizer without chat template",
        {"dataset_name": "{messages}", "tokenizer_name_or_path": "{dir}/no_template"},
        ["chat template"],
    ),
    (
        "messages is a string",
        {"dataset_name": "{messages_str}"},
        ["row 0, column 'messages'", "str"],
    ),
    (
        "message without content",
        {"dataset_name": "{messages_nocontent}"},
        ["row 0, column 'messages'"],
    ),
    (
        "messages with no assistant turn",
        {"dataset_name": "{messages_no_assistant}"},
        ["1 no assistant turn"],
    ),
    ("empty prompts and completions", {"dataset_name": "{empty_strings}"}, ["3 empty completion"]),
    ("every prompt exceeds max_length", {"max_length": 4}, ["no example left", "max_length=4"]),
    ("eval split that does not exist", {"eval_split": "test"}, ["split 'test'"]),
    ("negative learning rate", {"learning_rate": -1e-3}, ["--learning_rate must be > 0"]),
    ("zero learning rate", {"learning_rate": 0.0}, ["--learning_rate must be > 0"]),
    ("logging_steps 0", {"logging_steps": 0}, ["--logging_steps must be >= 1"]),
    ("eval_steps 0", {"eval_steps": 0}, ["--eval_steps must be >= 1"]),
    ("negative save_steps", {"save_steps": -1}, ["--save_steps"]),
    ("max_prompt_length 0", {"max_prompt_length": 0}, ["--max_prompt_length must be >= 1"]),
    ("negative max_prompt_length", {"max_prompt_length": -3}, ["--max_prompt_length must be >= 1"]),
    (
        "batch size 0",
        {"per_device_train_batch_size": 0},
        ["--per_device_train_batch_size must be >= 1"],
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
    ("output_dir is a file", {"output_dir": "{pc}"}, ["is a file"]),
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
        "resume from a path that is no checkpoint",
        {"resume_from_checkpoint": "{dir}/step_9"},
        ["no step.json"],
    ),
    (
        "resume with other arguments",
        {"output_dir": "{done}", "resume_from_checkpoint": "latest", "learning_rate": 1e-3},
        ["differ", "learning_rate"],
    ),
    (
        "resume from truncated weights",
        {"output_dir": "{truncated}", "resume_from_checkpoint": "latest"},
        ["cannot resume from this checkpoint"],
    ),
]


@pytest.mark.parametrize("case,overrides,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(
    case, overrides, needles, tiny_model, files, finished_run, tmp_path
):
    if "{truncated}" in str(
        overrides
    ):  # a copy of the finished run whose last checkpoint is cut short
        shutil.copytree(finished_run, tmp_path / "truncated")
        weights = tmp_path / "truncated" / "checkpoints" / "step_1" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    places = {
        **files,
        "model": tiny_model,
        "out": str(tmp_path / "out"),
        "done": str(finished_run),
        "truncated": str(tmp_path / "truncated"),
    }
    kwargs = {
        "model_name_or_path": tiny_model,
        "dataset_name": files["pc"],
        "max_steps": 1,
        "per_device_train_batch_size": 1,
        "save_steps": 0,
        "output_dir": str(tmp_path / "out"),
    }
    kwargs.update(
        {k: v.format(**places) if isinstance(v, str) else v for k, v in overrides.items()}
    )
    message = main_error("sft.py", **kwargs)
    for needle in needles:
        assert needle in message, message
    if (
        "output_dir" not in overrides
    ):  # stopped before writing anything: a corrected rerun just works
        assert not (tmp_path / "out").exists()


def test_command_line_no_arguments_and_help(run_script, capsys, tmp_path):
    # offline, the hub defaults cannot load: one line, not an 85-line traceback
    assert_one_line_error(
        run_script("sft.py", check=False), "cannot load a tokenizer", "pythia-160m"
    )
    help_text = tyro_help(sft.Args, capsys)
    assert "Supervised fine-tuning (SFT): train a causal LM on demonstrations" in help_text
    assert "python sft.py --model_name_or_path path/to/model --dataset_name data.jsonl" in help_text


def test_empty_prompt_uses_bos_as_context(tiny_model):
    """An empty prompt with a tokenizer that adds no BOS: the completion's first token is still a target."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert tok("").input_ids == []  # this tokenizer adds no BOS
    ds = sft.Dataset.from_list([{"prompt": "", "completion": "hello"}])
    (ex,) = sft.tokenize_sft(ds, tok, 64, None, "t")
    completion = tok("hello", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert ex["input_ids"] == [tok.bos_token_id] + completion
    assert sum(ex["loss_mask"][1:]) == len(completion)  # every completion token, the first included


@pytest.mark.parametrize("path", ["./typo", "/typo", "a/b/c", "org/model"])
def test_a_model_path_that_cannot_load_fails_at_once(path, data_files, tmp_path, monkeypatch):
    """A typo fails in one line before anything loads, and a hub id whose hub cannot be reached says
    so at once instead of after ~50 s of download retries (the hub here is a closed loopback port, so
    the test touches no network)."""
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.time()
    args = dict(model_name_or_path=path, dataset_name=data_files["prompt_completion"])  # noqa: C408
    message = main_error("sft.py", **args, output_dir=str(tmp_path / "out"))
    assert time.time() - start < 5
    expected = "cannot be reached" if path == "org/model" else "no such directory"
    assert message.startswith(f"model {path}: ") and expected in message, message
