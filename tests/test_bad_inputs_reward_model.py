"""reward_model.py: every bad input a user can give gets one `error:` line (docs/design.md section 4).

The table runs main(Args(...)) in-process (main_error: no 4-second subprocess start); the command
line's own paths (no arguments, --help) run as subprocesses once each. Review numbers (rm #N) refer
to the reward_model.py table of ../shared/reviews/bad-inputs-and-newcomer.md."""

import json
import math
import pickle
import shutil
from types import SimpleNamespace

import pytest
from conftest import assert_one_line_error, main_error, tyro_help, write_jsonl

import reward_model as rm

PAIRS = [
    {"prompt": f"Q: {q}?\nA:", "chosen": f" {a}.", "rejected": " I do not know."}
    for q, a in [("one", "1"), ("two", "2"), ("six", "6"), ("ten", "10")]
]
SAFE = {"prompt": "Q", "response_0": "a", "response_1": "b", "better_response_id": 0, "safer_response_id": 1,
        "is_response_0_safe": True, "is_response_1_safe": False}  # fmt: skip
MSG = [{"role": "assistant", "content": "hi"}]

# name -> rows of a JSONL file
DATA = {
    "pairs": PAIRS,
    "no_rejected": [{"prompt": "Q", "chosen": " a"}],
    "list_of_str": [{"prompt": "Q", "chosen": ["a", "b"], "rejected": ["c"]}],
    "null_chosen": PAIRS[:2] + [{"prompt": "Q", "chosen": None, "rejected": " b"}],
    "int_rejected": [{"prompt": "Q", "chosen": " a", "rejected": 3}],
    "empty_strings": [{"prompt": "", "chosen": "", "rejected": ""}] * 4,
    "margin_nan": [{**p, "margin": 1.0} for p in PAIRS[:3]] + [{**PAIRS[3], "margin": math.nan}],
    "margin_inf": [{**PAIRS[0], "margin": math.inf}],
    "margin_str": [{**p, "margin": "big"} for p in PAIRS],
    "margin_null": [{**PAIRS[0], "margin": 1.0}, {**PAIRS[1], "margin": None}],
    "hh_no_assistant": [{"chosen": "\n\nHuman: hi there", "rejected": "\n\nHuman: hello"}],
    "saferlhf_bad_id": [SAFE, {**SAFE, "better_response_id": 2}],
    "saferlhf_missing_safe": [{k: v for k, v in SAFE.items() if not k.startswith("is_")}],
    "saferlhf_margin": [
        {**SAFE, "margin": 1.0},
        {**SAFE, "is_response_1_safe": True, "margin": 1.0},
    ],
    "messages_str_prompt": [{"prompt": "Q", "chosen": MSG, "rejected": MSG}],
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("rm_bad")
    paths = {name: write_jsonl(d / f"{name}.jsonl", rows) for name, rows in DATA.items()}
    (d / "empty.jsonl").write_text("")
    paths["empty"] = str(d / "empty.jsonl")
    (d / "malformed.jsonl").write_text('{"prompt": "a", "chosen": \n')
    paths["malformed"] = str(d / "malformed.jsonl")
    paths["dir"] = str(d)
    return paths


@pytest.fixture(scope="module")
def finished_run(tiny_model, files, tmp_path_factory):
    """An output_dir holding a finished 2-step run with checkpoints at step 1."""
    out = tmp_path_factory.mktemp("rm_done") / "out"
    rm.main(rm.Args(model_name_or_path=tiny_model, dataset_name=files["pairs"], max_steps=2, save_steps=1,
                    per_device_train_batch_size=2, output_dir=str(out)))  # fmt: skip
    return out


def damaged(finished_run, tmp_path, how: str) -> str:
    """A copy of the finished run whose step-1 checkpoint is damaged in one way."""
    out = tmp_path / how
    shutil.copytree(finished_run, out)
    ckpt = out / "checkpoints" / "step_1"
    if how == "corrupt_step_json":
        (ckpt / "step.json").write_text("{not json")
    elif how == "garbage_weights":
        (ckpt / "model.safetensors").write_bytes(b"garbage")
    elif how == "garbage_optimizer":
        (ckpt / "optimizer.bin").write_bytes(b"garbage")
    elif how == "only_tmp":  # killed between writing step.json and the rename (review L3)
        ckpt.rename(ckpt.with_name("step_1.tmp"))
    return str(out)


# (case, Args overrides with {name}/{model}/{out}/{done}/{damaged:how} placeholders, needles)
CASES = [
    ("rm #1 missing model path", {"model_name_or_path": "{dir}/no_model"}, ["no_model: no such directory"]),
    ("rm #2 missing dataset file", {"dataset_name": "{dir}/missing.jsonl"}, ["no such file"]),
    ("dataset path typo, no extension", {"dataset_name": "{dir}/pairs_typo"}, ["pairs_typo: no such file"]),
    ("rm #3 empty file", {"dataset_name": "{empty}"}, ["no data"]),
    ("rm #4 malformed JSON", {"dataset_name": "{malformed}"}, ["cannot load split 'train'"]),
    ("rm #5 missing rejected column", {"dataset_name": "{no_rejected}"}, ["expected one of"]),
    ("rm #6 responses are lists of str", {"dataset_name": "{list_of_str}"}, ["row 0, column 'chosen'", "list"]),
    ("rm #7 one null chosen", {"dataset_name": "{null_chosen}"}, ["row 2, column 'chosen'", "NoneType"]),
    ("rejected is an int", {"dataset_name": "{int_rejected}"}, ["row 0, column 'rejected'", "int"]),
    ("messages responses, string prompt", {"dataset_name": "{messages_str_prompt}"}, ["row 0", "prompt as messages"]),
    ("rm #8 empty strings", {"dataset_name": "{empty_strings}"}, ["4 with chosen identical to rejected"]),
    ("rm #9 every prompt exceeds max_length", {"max_length": 3}, ["no preference pair left", "max_length=3"]),
    ("rm #10 NaN margin", {"dataset_name": "{margin_nan}"}, ["row 3, column 'margin'", "nan"]),
    ("infinite margin", {"dataset_name": "{margin_inf}"}, ["row 0, column 'margin'", "inf"]),
    ("rm #11 margin is a string", {"dataset_name": "{margin_str}"}, ["row 0, column 'margin'", "'big'"]),
    ("null margin", {"dataset_name": "{margin_null}"}, ["row 1, column 'margin'", "None"]),
    ("rm #12 HH transcript without Assistant", {"dataset_name": "{hh_no_assistant}"}, ["without 'Assistant:'"]),
    # SafeRLHF-style rows (checked and converted by prepare_data.py): one line naming that command
    ("rm #13 SafeRLHF better_response_id 2", {"dataset_name": "{saferlhf_bad_id}"}, ["python prepare_data.py"]),
    ("rm #14 SafeRLHF without safety columns", {"dataset_name": "{saferlhf_missing_safe}"},
     ["python prepare_data.py"]),
    ("SafeRLHF with a margin column", {"dataset_name": "{saferlhf_margin}"}, ["python prepare_data.py"]),
    ("eval split that does not exist", {"eval_split": "test"}, ["split 'test'"]),
    ("rm #15 negative learning rate", {"learning_rate": -1e-3}, ["--learning_rate must be > 0"]),
    ("logging_steps 0", {"logging_steps": 0}, ["--logging_steps must be >= 1"]),
    ("rm #19 eval_steps 0", {"eval_steps": 0}, ["--eval_steps must be >= 1"]),
    ("max_prompt_length 0", {"max_prompt_length": 0}, ["--max_prompt_length must be >= 1"]),
    ("negative max_prompt_length", {"max_prompt_length": -3}, ["--max_prompt_length must be >= 1"]),
    ("negative centring coefficient", {"center_rewards_coefficient": -0.1}, ["--center_rewards_coefficient"]),
    ("batch size 0", {"per_device_train_batch_size": 0}, ["--per_device_train_batch_size must be >= 1"]),
    ("accumulation larger than the data", {"gradient_accumulation_steps": 8}, ["make no full step"]),
    ("tensorboard not installed", {"report_to": "tensorboard"}, ["tensorboard: the package is not installed"]),
    ("rm #20 output_dir is a file", {"output_dir": "{pairs}"}, ["is a file"]),
    ("output_dir holds a finished run", {"output_dir": "{done}"}, ["already holds a run", "--overwrite_output_dir"]),
    ("rm #18 --eval_only into the trained model's directory",
     {"eval_only": True, "model_name_or_path": "{done}", "output_dir": "{done}"}, ["another --output_dir"]),
    ("rm #16 --eval_only on a causal LM", {"eval_only": True}, ["no trained `score` head"]),
    ("resume latest with no checkpoint", {"resume_from_checkpoint": "latest"}, ["no checkpoint in"]),
    ("resume latest with only a leftover step_1.tmp",
     {"output_dir": "{damaged:only_tmp}", "resume_from_checkpoint": "latest"}, ["no checkpoint in"]),
    ("resume from a path that is no checkpoint", {"resume_from_checkpoint": "{dir}/step_9"}, ["no step.json"]),
    ("resume with other arguments",
     {"output_dir": "{done}", "resume_from_checkpoint": "latest", "learning_rate": 1e-3, "seed": 7},
     ["differ", "learning_rate, seed"]),
    ("rm #23 resume with a corrupt step.json",
     {"output_dir": "{damaged:corrupt_step_json}", "resume_from_checkpoint": "latest"},
     ["cannot resume from this checkpoint", "JSONDecodeError"]),
    ("resume from garbage weights",
     {"output_dir": "{damaged:garbage_weights}", "resume_from_checkpoint": "latest"},
     ["cannot resume from this checkpoint"]),
    ("rm #22 resume with a garbage optimizer.bin",
     {"output_dir": "{damaged:garbage_optimizer}", "resume_from_checkpoint": "latest"},
     ["cannot resume from this checkpoint"]),
]  # fmt: skip


@pytest.mark.parametrize("case,overrides,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(
    case, overrides, needles, tiny_model, files, finished_run, tmp_path
):
    places = {**files, "model": tiny_model, "out": str(tmp_path / "out"), "done": str(finished_run)}
    for how in ("corrupt_step_json", "garbage_weights", "garbage_optimizer", "only_tmp"):
        if f"{{damaged:{how}}}" in str(overrides):
            places[f"damaged:{how}"] = damaged(finished_run, tmp_path, how)
    kwargs = {"model_name_or_path": tiny_model, "dataset_name": files["pairs"], "max_steps": 2,
              "per_device_train_batch_size": 2, "save_steps": 0, "output_dir": str(tmp_path / "out")}  # fmt: skip
    for k, v in overrides.items():
        kwargs[k] = v
        if isinstance(v, str):
            for name, value in places.items():
                kwargs[k] = kwargs[k].replace(f"{{{name}}}", value)
    before = {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}
    message = main_error("reward_model.py", **kwargs)
    for needle in needles:
        assert needle in message, message
    if (
        "output_dir" not in overrides
    ):  # stopped before writing anything: a corrected rerun just works
        assert not (tmp_path / "out").exists()
    assert {
        p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()
    } == before  # nothing changed


class _Pwned:
    def __reduce__(self):
        return (open, ("PWNED_BY_PICKLE", "w"))


def test_resume_loads_no_pickled_objects(finished_run, tmp_path, monkeypatch):
    """Review rm #21: a tampered custom_checkpoint_0.pkl in a checkpoint ran code on resume (accelerate
    unpickles registered objects with weights_only=False). Our state is JSON and nothing is registered:
    accelerate refuses the unexpected file (one line) and never unpickles it; the clean checkpoint resumes."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    pkl = out / "checkpoints" / "step_1" / "custom_checkpoint_0.pkl"
    pkl.write_bytes(pickle.dumps(_Pwned()))
    monkeypatch.chdir(tmp_path)
    saved = json.loads((finished_run / "args.json").read_text())
    args = {**saved, "output_dir": str(out), "resume_from_checkpoint": "latest"}
    assert "cannot resume from this checkpoint" in main_error("reward_model.py", **args)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    pkl.unlink()
    rm.main(rm.Args(**args))
    assert (out / "model.safetensors").exists() and not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_leftover_tmp_checkpoint_is_skipped(finished_run, tmp_path):
    """Review L3: a step_N.tmp left by a kill during a save is not a checkpoint: 'latest' takes the newest
    complete one."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    shutil.copytree(out / "checkpoints" / "step_1", out / "checkpoints" / "step_5.tmp")
    assert (
        rm.find_checkpoint(SimpleNamespace(print=print), out, "latest")
        == out / "checkpoints" / "step_1"
    )


def test_command_line_no_arguments_and_help(run_script, capsys):
    # offline, the hub defaults cannot load: one line, not a traceback
    assert_one_line_error(run_script("reward_model.py", check=False), "Anthropic/hh-rlhf")
    help_text = tyro_help(rm.Args, capsys)
    assert "Reward modeling: train a Bradley-Terry reward model" in help_text
    assert (
        "python reward_model.py --model_name_or_path outputs/sft --dataset_name pairs.jsonl"
        in help_text
    )
