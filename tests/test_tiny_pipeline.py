"""examples/tiny_pipeline: the gold reward, and a --quick run of the whole pipeline (every stage connects)."""

import json
import math
import random
import subprocess
import sys

import pytest
from conftest import REPO, _env

sys.path.insert(0, str(REPO / "examples" / "tiny_pipeline"))
import run as pipeline  # noqa: E402


def test_gold_reward_partial_credit():
    assert pipeline.gold_reward("sort 3 1 2 =", " 1 2 3") == 1.0
    assert pipeline.gold_reward("sort 3 1 2 =", " 1 3") == 0.0  # 1 hit, 1 missing digit: (1 - 1) / 3
    assert pipeline.gold_reward("sort 3 1 2 =", " 1 2 3 3") == pytest.approx(2 / 3)  # 3 hits, 1 extra
    assert pipeline.gold_reward("sort 3 1 2 =", " 3 2 1") == pytest.approx(1 / 3)  # only the middle is right
    assert pipeline.gold_reward("sort 3 1 2 =", "") == -1.0
    assert pipeline.gold_reward_fn(["sort 2 1 ="] * 2, [" 1 2", " 2 1"]) == [1.0, 0.0]


def test_preference_data_comes_from_a_noisy_behaviour_policy(tmp_path):
    args = pipeline.Args(num_sft=50, num_pairs=400, num_eval_prompts=10)
    pipeline.make_data(tmp_path, args, seed=0)
    pairs = [json.loads(line) for line in open(tmp_path / "pairs.jsonl")]
    assert len(pairs) >= 440 and all(p["chosen"] != p["rejected"] for p in pairs)
    better = [pipeline.gold_reward(p["prompt"], p["chosen"]) > pipeline.gold_reward(p["prompt"], p["rejected"])
              for p in pairs]
    # Bradley-Terry labels: mostly right, not always (label noise)
    assert 0.6 < sum(better) / len(better) < 0.98
    answer = list("0123456789")
    assert pipeline.corrupt(answer, random.Random(1)) != answer or pipeline.corrupt(answer, random.Random(2)) != answer


def test_quick_pipeline_runs_every_stage(tmp_path):
    work, results = tmp_path / "work", tmp_path / "results"
    proc = subprocess.run([sys.executable, str(REPO / "examples/tiny_pipeline/run.py"), "--quick",
                           "--output_dir", str(work), "--results_dir", str(results)],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seed_dir = work / "seed_1"
    for stage in ["sft", "reward_model", "dpo", "dpo_iter", "ppo_baseline", "ppo_adv_norm", "ppo_large_batch", "ppo"]:
        assert (seed_dir / stage / "config.json").exists(), stage
    rm_config = json.loads((seed_dir / "reward_model" / "config.json").read_text())
    assert len(rm_config["id2label"]) == 1 and "reward_std" in rm_config  # one scalar output
    runs = json.loads((results / "results.json").read_text())
    assert len(runs) == 1
    for name in pipeline.POLICIES:
        assert all(math.isfinite(v) for v in runs[0][name].values()), name
    assert runs[0]["sft"]["kl"] == 0.0  # the SFT policy against itself
    table = (results / "results.md").read_text()
    for label in pipeline.LABELS.values():
        assert f"| {label} |" in table
    assert (results / "gold_vs_kl.png").stat().st_size > 1000
