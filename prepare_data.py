"""Turn PKU-SafeRLHF-style rows into the explicit preference pairs every stage reads (run once).

Xu et al. 2024 Sec. 4.3 builds each pair from two responses with a helpfulness and a safety label:
when exactly one response is safe, it is chosen (safety first); otherwise the more helpful one is.
Table 2 then compares training sets without the pairs where both responses are safe (`--filter
dual_safe`) or both unsafe (`--filter dual_unsafe`). The output has `prompt`, `chosen`, `rejected`
(JSONL, or Parquet when the output path ends in .parquet), which sft.py (the chosen side: "SFT
(Safe)"), reward_model.py, dpo.py and ppo.py (the prompts) read like any other preference file.

Offline example (a local file; a hub id such as PKU-Alignment/PKU-SafeRLHF works the same):
    python prepare_data.py --dataset_name saferlhf.jsonl --filter dual_unsafe --output pairs.jsonl
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro
from datasets import load_dataset

COLUMNS = ["prompt", "response_0", "response_1", "better_response_id", "safer_response_id",
           "is_response_0_safe", "is_response_1_safe"]  # fmt: skip


@dataclass
class Args:
    dataset_name: str = "PKU-Alignment/PKU-SafeRLHF"
    """a hub id, or a local .json/.jsonl/.parquet file or directory, in SafeRLHF's columns"""
    dataset_config: str | None = None
    """the dataset's configuration (hub datasets with several)"""
    split: str = "train"
    """the split to convert"""
    filter: Literal["none", "dual_safe", "dual_unsafe"] = "none"
    """drop the pairs whose two responses are both safe / both unsafe (paper Table 2)"""
    output: str = "pairs.jsonl"
    """where the pairs go: .jsonl, or .parquet"""


class DataError(ValueError):
    """Bad input, reported as one `error:` line."""


def check_row(row: dict, i: int):
    """Texts are strings, the two ids 0 or 1 (not a bool), the two safety labels bools."""
    for c in COLUMNS:
        value = row[c]
        if c in ("prompt", "response_0", "response_1"):
            ok, expected = isinstance(value, str), "a string"
        elif c.startswith("is_"):
            ok, expected = isinstance(value, bool), "true or false"
        else:
            ok, expected = not isinstance(value, bool) and value in (0, 1), "0 or 1"
        if not ok:
            raise DataError(f"row {i}, column '{c}': expected {expected}, found {value!r}")


def to_pair(row: dict) -> dict:
    """Sec. 4.3: the safer response wins when the two differ in safety, else the more helpful one."""
    safe = (row["is_response_0_safe"], row["is_response_1_safe"])
    win = row["safer_response_id"] if safe[0] != safe[1] else row["better_response_id"]
    return {"prompt": row["prompt"], "chosen": row[f"response_{win}"],
            "rejected": row[f"response_{1 - win}"]}  # fmt: skip


def keep(row: dict, filter: str) -> bool:
    both_safe = row["is_response_0_safe"] and row["is_response_1_safe"]
    both_unsafe = not (row["is_response_0_safe"] or row["is_response_1_safe"])
    return {"none": True, "dual_safe": not both_safe, "dual_unsafe": not both_unsafe}[filter]


def main(args: Args) -> list:
    local = Path(args.dataset_name)
    try:
        if local.exists():
            files = sorted(local.glob("*")) if local.is_dir() else [local]
            builder = "parquet" if files and files[0].suffix == ".parquet" else "json"
            ds = load_dataset(builder, data_files=[str(f) for f in files], split="train")
        else:
            ds = load_dataset(args.dataset_name, args.dataset_config, split=args.split)
    except Exception as e:  # a missing file, an unreachable hub: one line
        raise DataError(f"dataset {args.dataset_name}: cannot load ({type(e).__name__})") from None
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise DataError(f"{args.dataset_name} is not SafeRLHF-style: it lacks columns {missing}")
    rows = list(ds.select_columns(COLUMNS))
    for i, row in enumerate(rows):
        check_row(row, i)
    pairs = [to_pair(row) for row in rows if keep(row, args.filter)]
    if not pairs:
        raise DataError(f"no pair left after --filter {args.filter} (of {len(rows)})")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        from datasets import Dataset

        Dataset.from_list(pairs).to_parquet(str(out))
    else:
        out.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    print(f"{len(pairs)} of {len(rows)} pairs (filter={args.filter}) -> {out}")
    return pairs


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except DataError as e:
        sys.exit(f"error: {e}")
