"""prepare_data.py: PKU-SafeRLHF-style rows -> the explicit preference pairs every stage reads, with the
paper's Sec. 4.3 construction and the Table 2 filters; the training scripts refuse such rows in one
line that names this command."""

import json

import pytest
from conftest import main_error, write_jsonl

import prepare_data

SAFE = {"prompt": "Q", "response_0": "a", "response_1": "b", "better_response_id": 0,
        "safer_response_id": 1, "is_response_0_safe": True, "is_response_1_safe": False}  # fmt: skip


def convert(data, tmp_path, filter="none", output="pairs.jsonl") -> list:
    args = prepare_data.Args(dataset_name=data, filter=filter, output=str(tmp_path / output))
    return prepare_data.main(args)


def test_construction_and_both_filters(data_files, tmp_path):
    rows = [json.loads(line) for line in open(data_files["saferlhf"])]
    pairs = convert(data_files["saferlhf"], tmp_path)
    assert len(pairs) == len(rows)
    for row, pair in zip(rows, pairs):
        s0, s1 = row["is_response_0_safe"], row["is_response_1_safe"]
        win = row["safer_response_id"] if s0 != s1 else row["better_response_id"]  # Sec. 4.3
        assert pair == {"prompt": row["prompt"], "chosen": row[f"response_{win}"],
                        "rejected": row[f"response_{1 - win}"]}  # fmt: skip
    both_safe = sum(r["is_response_0_safe"] and r["is_response_1_safe"] for r in rows)
    both_unsafe = sum(not (r["is_response_0_safe"] or r["is_response_1_safe"]) for r in rows)
    assert both_safe > 0 and both_unsafe > 0
    assert len(convert(data_files["saferlhf"], tmp_path, "dual_safe")) == len(rows) - both_safe
    assert len(convert(data_files["saferlhf"], tmp_path, "dual_unsafe")) == len(rows) - both_unsafe
    # the output is a preference file the stages read, JSONL or Parquet
    import dpo

    for output in ("pairs.jsonl", "pairs.parquet"):
        convert(data_files["saferlhf"], tmp_path, "dual_unsafe", output)
        ds = dpo.to_preference(dpo.load_split(str(tmp_path / output), None, "train"))
        assert len(ds) == len(rows) - both_unsafe


@pytest.mark.parametrize(
    "rows,filter,needle",
    [
        ([SAFE, {**SAFE, "better_response_id": 2}], "none", "row 1, column 'better_response_id'"),
        ([{**SAFE, "is_response_0_safe": 1}], "none", "expected true or false"),
        ([{k: v for k, v in SAFE.items() if not k.startswith("is_")}], "none", "lacks columns"),
        ([{**SAFE, "is_response_1_safe": True}] * 2, "dual_safe", "no pair left"),
        ([{**SAFE, "response_0": None}], "none", "row 0, column 'response_0': expected a string"),
    ],
)
def test_bad_rows_are_one_error_line(rows, filter, needle, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(prepare_data.DataError, match=needle):
        convert(path, tmp_path, filter)
    assert not (tmp_path / "pairs.jsonl").exists()


@pytest.mark.parametrize("script", ["sft.py", "reward_model.py", "dpo.py", "ppo.py"])
def test_training_scripts_name_the_command_for_saferlhf_rows(
    script, tiny_model, data_files, tmp_path
):
    reward = tmp_path / "reward.py"
    reward.write_text("def f(prompts, completions):\n    return [0.0] * len(completions)\n")
    extra = {"reward_fn": f"{reward}:f"} if script == "ppo.py" else {}
    message = main_error(script, model_name_or_path=tiny_model, dataset_name=data_files["saferlhf"],
                         output_dir=str(tmp_path / "out"), **extra)  # fmt: skip
    assert "python prepare_data.py" in message, message


def test_no_training_script_reads_saferlhf_columns():
    from conftest import REPO

    for script in ("sft.py", "reward_model.py", "dpo.py", "ppo.py"):
        assert "better_response_id" not in (REPO / script).read_text(), script
