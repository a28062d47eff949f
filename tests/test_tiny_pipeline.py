"""examples/tiny_pipeline: the task and its labellers, the study's directory rules (a quick run never
touches the committed study; a stage whose settings changed is redone), and a --quick run of every stage."""

import json
import math
import random
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, _env, tyro_help

HERE = REPO / "examples" / "tiny_pipeline"
sys.path.insert(0, str(HERE))
import run as pipeline
import task


def test_gold_reward_partial_credit():
    assert task.gold_reward("sort 3 1 2 =", " 1 2 3") == 1.0
    assert task.gold_reward("sort 3 1 2 =", " 1 3") == 0.0  # 1 hit, 1 missing digit: (1 - 1) / 3
    assert task.gold_reward("sort 3 1 2 =", " 1 2 3 3") == pytest.approx(2 / 3)  # 3 hits, 1 extra
    assert task.gold_reward("sort 3 1 2 =", " 3 2 1") == pytest.approx(
        1 / 3
    )  # only the middle is right
    assert task.gold_reward("sort 3 1 2 =", "") == -1.0
    assert task.gold_reward_fn(["sort 2 1 ="] * 2, [" 1 2", " 2 1"], finished=[True, True]) == [
        1.0,
        0.0,
    ]


def test_noisy_labeller_has_the_calibrated_pairwise_accuracy():
    rng = random.Random(0)
    prompts = [task.make_prompt(rng, 4, 8) for _ in range(400)]
    pairs = [
        (
            q,
            " " + " ".join(task.corrupt(task.target(q), rng)),
            " " + " ".join(task.corrupt(task.target(q), rng)),
        )
        for q in prompts
    ]
    pairs = [(q, x, y) for q, x, y in pairs if task.gold_reward(q, x) != task.gold_reward(q, y)]
    gaps = [abs(task.gold_reward(q, x) - task.gold_reward(q, y)) for q, x, y in pairs]
    for accuracy in (0.95, 0.75):
        temperature = task.calibrate_temperature(gaps, accuracy)
        assert task.pairwise_accuracy(gaps, temperature) == pytest.approx(accuracy, abs=1e-3)
        label = task.NoisyGold(temperature, seed=1)
        right = []
        for _ in range(20):  # fresh noise on every call: Bradley-Terry comparisons
            sx = label([q for q, _, _ in pairs], [x for _, x, _ in pairs])
            sy = label([q for q, _, _ in pairs], [y for _, _, y in pairs])
            right += [
                (a > b) == (task.gold_reward(q, x) > task.gold_reward(q, y))
                for a, b, (q, x, y) in zip(sx, sy, pairs)
            ]
        assert sum(right) / len(right) == pytest.approx(accuracy, abs=0.02)


def test_behaviour_policy_covers_wrong_lengths():
    rng = random.Random(3)
    lengths = {len(task.corrupt(list("0123456"), rng)) for _ in range(300)}
    assert min(lengths) < 7 < max(lengths)


def test_quick_never_writes_into_the_committed_study(tmp_path):
    for flag in ("output_dir", "results_dir"):
        with pytest.raises(pipeline.StudyError, match="--quick never writes into"):
            pipeline.prepare_dirs(pipeline.Args(quick=True, **{flag: str(HERE / "x")}))
    args = pipeline.Args(quick=True)
    pipeline.prepare_dirs(args)  # default: a new temporary directory, results under it
    try:
        assert not Path(args.output_dir).is_relative_to(REPO)
        assert Path(args.results_dir).is_relative_to(args.output_dir)
    finally:
        import shutil

        shutil.rmtree(args.output_dir)


def test_full_run_refuses_a_work_dir_of_a_quick_run(tmp_path):
    quick = pipeline.Args(quick=True, output_dir=str(tmp_path / "work"))
    pipeline.quick_sizes(quick)
    pipeline.prepare_dirs(quick)
    (tmp_path / "work" / "seed_1").mkdir()
    with pytest.raises(pipeline.StudyError, match="holds a study with other settings .*max_digits"):
        pipeline.prepare_dirs(pipeline.Args(output_dir=str(tmp_path / "work")))
    assert (tmp_path / "work" / "seed_1").exists()  # nothing touched
    pipeline.prepare_dirs(pipeline.Args(output_dir=str(tmp_path / "work"), restart=True))
    assert not (tmp_path / "work" / "seed_1").exists()  # --restart discards the quick study
    pipeline.prepare_dirs(
        pipeline.Args(output_dir=str(tmp_path / "work"))
    )  # same settings: resumes


def test_a_stage_is_redone_when_its_settings_or_upstream_change(tmp_path, monkeypatch):
    calls = []

    @dataclass
    class Args:
        output_dir: str = ""
        lr: float = 0.0
        overwrite_output_dir: bool = False

    def main(args):
        if (Path(args.output_dir) / "args.json").exists() and not args.overwrite_output_dir:
            raise SystemExit("error: already holds a run")  # what the real scripts do
        calls.append(args)
        (Path(args.output_dir) / "args.json").write_text("{}")

    monkeypatch.setitem(sys.modules, "fake_stage", types.SimpleNamespace(Args=Args, main=main))
    up, out = tmp_path / "up", tmp_path / "out"
    pipeline.run_stage(up, "fake_stage", ["--lr", 1])
    pipeline.run_stage(out, "fake_stage", ["--lr", 1], upstream=(up,))
    pipeline.run_stage(out, "fake_stage", ["--lr", 1], upstream=(up,))
    assert len(calls) == 2  # the same settings: reused
    pipeline.run_stage(out, "fake_stage", ["--lr", 2], upstream=(up,))
    assert len(calls) == 3 and calls[-1].lr == 2 and calls[-1].overwrite_output_dir
    pipeline.run_stage(up, "fake_stage", ["--lr", 3])
    pipeline.run_stage(out, "fake_stage", ["--lr", 2], upstream=(up,))
    assert len(calls) == 5  # its upstream stage changed: redone
    (out / "stage.json").unlink()  # killed before it finished: redone
    pipeline.run_stage(out, "fake_stage", ["--lr", 2], upstream=(up,))
    assert len(calls) == 6


def test_paired_confidence_interval():
    m, h = pipeline.mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert pipeline.verdict([0.1, 0.12, 0.11], "ppo", "dpo") == "PPO better"
    assert pipeline.verdict([0.1, -0.1, 0.05], "ppo", "dpo") == "not resolved"


def test_t_test_holm_and_headroom_estimators():
    assert pipeline.t_cdf(2.262, 9) == pytest.approx(0.975, abs=2e-4)
    assert pipeline.t_quantile(0.975, 19) == pytest.approx(2.093, abs=1e-3)
    t = pipeline.paired_test([0.1, 0.12, 0.11])
    assert t["half_width"] == pytest.approx(pipeline.mean_ci([0.1, 0.12, 0.11])[1], rel=1e-3)
    assert pipeline.holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx(
        {"a": 0.03, "b": 0.06, "c": 0.06}
    )
    # E[max of 2 of {0, 1, 2}] over the 3 pairs: (1 + 2 + 2) / 3
    assert pipeline.best_of_n_oracle([2.0, 0.0, 1.0], 2) == pytest.approx(5 / 3)
    assert pipeline.best_of_n_oracle([0.0, 1.0, 2.0, 3.0], 1) == pytest.approx(1.5)
    # the same uniform decides every temperature: a noisier labeller's flips include a cleaner one's
    assert pipeline.bt_wins(1.0, 0.0, 0.5, 0.0) and pipeline.bt_wins(1.0, 0.0, 0.9, 0.1)
    assert not pipeline.bt_wins(1.0, 0.0, 0.9, 1.0)


def test_a_choice_on_an_edge_extends_the_grid():
    lrs, coefs = [1e-4, 3e-4, 1e-3, 3e-3], [0.03, 0.1, 0.3]
    assert pipeline.extended_grid(lrs, coefs, "0.0003,0.1") is None  # inside: done
    new_lrs, new_coefs = pipeline.extended_grid(lrs, coefs, "0.003,0.1")
    assert new_lrs[-1] == pytest.approx(9e-3) and new_coefs == coefs
    new_lrs, new_coefs = pipeline.extended_grid(lrs, coefs, "0.0001,0.03")
    assert new_lrs[0] == pytest.approx(1e-4 / 3) and new_coefs[0] == pytest.approx(0.009)
    # every method's grid has the same size, at least 4 learning rates x 3 coefficients
    a = pipeline.Args()
    assert len(a.ppo_lrs) == len(a.dpo_lrs) >= 4 and len(a.ppo_coefs) == len(a.dpo_coefs) >= 3
    assert len(a.seeds) >= 20 and not set(a.seeds) & set(range(20)) and len(a.budgets) >= 2


def committed_files() -> dict:
    return {
        p: p.stat().st_mtime_ns
        for p in HERE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and "work" not in p.relative_to(HERE).parts
    }


def test_quick_runs_every_stage_into_a_temporary_directory():
    before = committed_files()
    start = time.time()
    proc = subprocess.run(
        [sys.executable, str(HERE / "run.py"), "--quick"],
        check=False,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"quick run: {time.time() - start:.0f} s")
    results_md = Path(proc.stdout.strip().splitlines()[-1].split("done: ")[1])
    work = results_md.parents[1]
    try:
        assert committed_files() == before  # nothing in examples/tiny_pipeline/ written or touched
        assert not work.is_relative_to(REPO)
        results = json.loads((results_md.parent / "results.json").read_text())
        assert set(results) == {
            "seeds", "budgets", "arms", "ablation", "headroom", "preregistered", "holm",
        }  # fmt: skip
        assert len(results["seeds"]) == 1 and len(results["budgets"]) == 2
        assert set(results["headroom"]) >= set(pipeline.HEADROOM)
        h = {k: v[0] for k, v in results["headroom"].items()}
        assert h["sft"] < h["best_of_2"] < h["best_of_4"] <= 1.0
        assert set(results["holm"]) == set(results["preregistered"]["contrasts"])
        assert len(results["holm"]) == len(pipeline.PRIMARY) * 2
        assert set(results["arms"]) == set(pipeline.ARMS)
        for arm, body in results["arms"].items():
            assert set(body) == {"labeller_accuracy", "methods", "budgets"}
            assert set(body["budgets"]) == {str(b) for b in results["budgets"]}
            assert body["methods"] == body["budgets"][str(max(results["budgets"]))]["methods"]
            for b, per in body["budgets"].items():
                assert 0.0 <= per["labeller_accuracy"] <= 1.0
                assert set(per["methods"]) == {"sft", *pipeline.ARMS[arm]}
                assert all(len(v) == 1 and math.isfinite(v[0]) for v in per["baselines"].values())
                for method, metrics in per["methods"].items():
                    assert set(metrics) == set(pipeline.METRICS)
                    assert all(len(v) == 1 and math.isfinite(v[0]) for v in metrics.values()), (
                        arm, b, method,
                    )  # fmt: skip
                assert per["methods"]["sft"]["kl_to_sft"] == [0.0]
                # every preference stage changed the policy (no run is a silent no-op, e.g. at lr 0):
                # the sampled KL estimate to SFT is exactly 0 only for SFT's own weights
                for method in pipeline.ARMS[arm]:
                    assert per["methods"][method]["kl_to_sft"][0] != 0.0, (arm, b, method)
        assert set(results["ablation"]) == {"baseline", "adv_norm", "large_batch", "ref_ema"}
        assert all(
            set(v) == {"gold_sampled"} and len(v["gold_sampled"]) == 1
            for v in results["ablation"].values()
        )
        table = results_md.read_text()
        assert "## Contrasts" in table and "## Table 3 ablation" in table and "PARTIAL" not in table
        assert "[-3, 1]" in table
        assert (results_md.parent / "gold_vs_budget.png").stat().st_size > 1000
        assert json.loads((results_md.parent / "headroom.json").read_text())["settings"]
        tuning = json.loads((work / "tuning.json").read_text())
        assert set(tuning["chosen"]) == set(results["arms"])
        # every stage ran through the real scripts
        seed = work / f"seed_{results['seeds'][0]}"
        b0, b1 = results["budgets"]
        for stage in ["sft", "rm_large", f"rm_d_{b1}", f"runs/main/gold/{b0}/dpo",
                      f"runs/main/gold/{b1}/ppo", f"runs/ablation/gold/{b0}/ppo"]:  # fmt: skip
            assert list((seed / stage).rglob("config.json")), stage
        # the reward models start from an SFT model of their own, larger than the policy
        layers = lambda p: json.loads((seed / p / "config.json").read_text())["num_hidden_layers"]
        assert (layers("sft"), layers("sft_rm"), layers("rm_large")) == (2, 4, 4)
        flags = lambda p: json.loads(next((seed / p).rglob("stage.json")).read_text())["argv"]
        value = lambda f, k: f[f.index(k) + 1]
        rm_d = json.loads((seed / f"rm_d_noisy_{b1}" / "checks.json").read_text())
        for method in ("ppo", "dpo_iter"):  # the same labeller and penalty for PPO and DPO-Iter
            f = flags(f"runs/main/rm_d_noisy/{b1}/{method}")
            assert value(f, "--reward_model_name_or_path").endswith(f"rm_d_noisy_{b1}")
            assert float(value(f, "--missing_eos_penalty")) == pytest.approx(
                rm_d["missing_eos_penalty"]
            )
            assert value(f, "--lr_scheduler") == "constant" and value(f, "--warmup_ratio") == "0"
        assert value(flags(f"runs/main/gold/{b1}/ppo"), "--total_episodes") == str(b1)
        # DPO-Iter: the paper's chain (one run of --iterations rounds, no fixed reference); the
        # ablation anchors every round to SFT
        chain = flags(f"runs/main/rm_large/{b1}/dpo_iter")
        assert "--ref_model_name_or_path" not in chain and value(chain, "--iterations") == "2"
        anchored = flags(f"runs/main/rm_large/{b1}/dpo_iter_sft")
        assert value(anchored, "--ref_model_name_or_path") == str(seed / "sft")
        # a second run with the same settings reuses every cell
        again = subprocess.run(
            [
                sys.executable,
                str(HERE / "run.py"),
                "--quick",
                "--output_dir",
                str(work),
                "--jobs",
                "1",
            ],
            check=False,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert json.loads((work / "results" / "results.json").read_text()) == results
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def test_help_says_what_the_study_does(capsys):
    """--help (in-process) names the study and its quick form."""
    help_text = tyro_help(pipeline.Args, capsys)
    assert "SFT, reward model, DPO, DPO-Iter and PPO under labellers of known accuracy" in help_text
    assert "python examples/tiny_pipeline/run.py --quick" in help_text
