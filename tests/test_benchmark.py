"""benchmarks/speed.py runs (its --quick mode: a tiny model, one repeat, a few seconds) and prints the table
the README's speed section is written from. A smoke test of its plumbing, not a timing test."""

import re

ROWS = [
    "`sft.py`",
    "`reward_model.py`",
    "`dpo.py`",
    "`dpo.py`",
    "`ppo.py`",
]  # DPO: live, precomputed


def test_quick_benchmark_prints_one_row_per_stage(run_script, tmp_path):
    out = tmp_path / "table.md"
    proc = run_script("benchmarks/speed.py", "--quick", "--out", out)
    text = out.read_text()
    assert text in proc.stdout
    header, rows = text.splitlines()[0], [r for r in text.splitlines() if r.startswith("| `")]
    assert header.startswith("`python benchmarks/speed.py --quick --out")
    assert re.search(r"load average \(1 min\) [\d.]+-[\d.]+ on \d+ cores", header), header
    assert [r.split(" | ")[0][2:] for r in rows] == ROWS  # one PPO length in --quick
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 7, row
        script, bare, ratio = float(cells[2]), float(cells[3]), float(cells[4].strip("*"))
        assert script > 0 and bare > 0 and abs(ratio - script / bare) < 0.2 * ratio, row
        assert all(float(x) > 0 for x in cells[6].split(" / ")), row  # peak RSS of each side
