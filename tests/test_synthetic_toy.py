import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pytest
import torch

torch.set_num_threads(1)
from conftest import REPO, tyro_help

import synthetic_toy as st


def test_table1_dpo_loss_closed_form_and_eq7():
    assert st.table1_dpo_loss(0.5, 0.5, 0.1) == pytest.approx(math.log(2))
    assert st.table1_dpo_loss(0.1, 0.0, 0.1) == 0.0
    a, b, beta = 0.3, 0.2, 0.1
    expected = math.log(1 + (b / a) ** beta)
    got = st.dpo_loss(
        torch.tensor([math.log(a)]),
        torch.tensor([math.log(b)]),
        torch.tensor([math.log(0.5)]),
        torch.tensor([math.log(0.5)]),
        beta,
    )
    assert st.table1_dpo_loss(a, b, beta) == pytest.approx(expected)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_rl_optimum_keeps_y3_at_zero():
    pi_ref = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    for r in ([1.0, 0.0, 0.0], [0.0, 0.0, 100.0], [-5.0, 3.0, 50.0]):
        pi = st.rl_optimal_policy(pi_ref, torch.tensor(r, dtype=torch.float64), 0.1)
        assert pi[2].item() == 0.0
        assert pi.sum().item() == pytest.approx(1.0)
    pi = st.rl_optimal_policy(pi_ref, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), 1.0)
    assert pi[0].item() == pytest.approx(math.e / (math.e + 1))


def test_dpo_loss_hand_computed():
    # margin = (-1 - -2) - (-3 - -2) = 2; beta = 0.5 -> -log sigmoid(1) = log(1 + e^-1)
    loss = st.dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5
    )
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)


def test_bt_loss_hand_computed():
    assert st.bt_loss(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(
        math.log(1 + math.exp(-1)), rel=1e-6
    )


def test_ppo_clip_objective_hand_computed():
    logp_old = torch.zeros(3)
    logp_new = torch.log(torch.tensor([1.5, 0.5, 1.1]))
    adv = torch.tensor([1.0, -1.0, 2.0])
    # ratio 1.5, A=1 -> min(1.5, 1.2) = 1.2; ratio 0.5, A=-1 -> min(-0.5, -0.8) = -0.8; ratio 1.1, A=2 -> 2.2
    got = st.ppo_clip_objective(logp_new, logp_old, adv, 0.2)
    assert got.item() == pytest.approx((1.2 - 0.8 + 2.2) / 3, rel=1e-6)


def test_coverage_metrics_hand_computed():
    pi_ref = torch.full((2, 2), 0.5)
    pi = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    covered = torch.tensor([[True, False], [False, True]])
    m = st.coverage_metrics(pi, pi_ref, covered, 0.01)
    assert m["diag_prob"] == pytest.approx(0.8)
    assert m["uncovered_mass"] == pytest.approx(0.2)
    assert m["n_uncovered_up"] == 0


def test_data_diagonal_chosen_and_coverage():
    g = torch.Generator().manual_seed(0)
    x, w, lo, covered = st.make_preference_data(8, 8, 2, g)
    assert len(x) == 16 and torch.equal(x, w) and not (w == lo).any()
    assert covered.sum().item() == 8 * 3


def test_reference_mle_covers_pairs_only():
    args = st.Args(dpo_steps=0, rm_steps=0, ppo_steps=0, dpo_iter_rounds=0)
    run = st.run_seed(args, 0)
    covered, p = torch.tensor(run["covered"]), torch.tensor(run["probs"]["pi_ref"])
    # uniform over the 3 covered responses of each prompt (diagonal not favoured), uncovered low but > 0
    assert torch.allclose(p[covered].view(8, 3), torch.full((8, 3), 1 / 3), atol=0.01)
    assert (p[~covered] > 0).all() and p[~covered].max().item() < 0.01


def test_normalize_reward_hand_computed():
    # one prompt, pi_ref = (0.5, 0.5, 0): mean 1 and std 1 under pi_ref -> (-1, 1, 9); ranks kept
    r = st.normalize_reward(torch.tensor([[0.0, 2.0, 10.0]]), torch.tensor([[0.5, 0.5, 0.0]]))
    assert torch.allclose(r, torch.tensor([[-1.0, 1.0, 9.0]]))


def test_mean_ci95_student_t():
    # t_{0.975, 19} = 2.093 and t_{0.975, 9} = 2.262 (tables); sample std of 0..19 is sqrt(35)
    got = st.mean_ci95([float(i) for i in range(20)])
    assert got["mean"] == pytest.approx(9.5)
    assert got["ci95"] == pytest.approx(2.093 * math.sqrt(35) / math.sqrt(20), rel=1e-3)
    assert st.mean_ci95([0.0, 1.0] * 5)["ci95"] == pytest.approx(
        2.262 * math.sqrt(5 / 18) / math.sqrt(10), rel=2e-3
    )
    assert math.isnan(st.mean_ci95([1.0])["ci95"])


def test_claim_parts_and_rates():
    def run(ref, dpo, ppo, dpo_diag, ppo_diag):
        m = {
            "pi_ref": {"uncovered_mass": ref, "diag_prob": 0.3},
            "DPO": {"uncovered_mass": dpo, "diag_prob": dpo_diag},
            "PPO": {"uncovered_mass": ppo, "diag_prob": ppo_diag},
        }
        return {"metrics": m, "claim": st.claim_parts(m)}

    runs = [run(0.0, 0.5, 0.1, 0.5, 0.9), run(0.0, 0.0, 0.1, 1.0, 0.9)]
    assert runs[0]["claim"] == {"a": True, "b": True, "c": True}
    assert runs[1]["claim"] == {"a": False, "b": False, "c": False}
    _, claim = st.summarize(runs)
    assert claim["rate"] == {"a": 0.5, "b": 0.5, "c": 0.5, "all": 0.5}
    assert claim["b: DPO - PPO uncovered"]["mean"] == pytest.approx(0.15)
    assert claim["c: PPO - DPO diagonal"]["mean"] == pytest.approx(0.15)


def test_main_writes_outputs_with_the_claim_table(tmp_path, capsys):
    args = st.Args(
        seeds=[0, 1],
        output_dir=str(tmp_path),
        ref_steps=2,
        dpo_steps=2,
        rm_steps=2,
        ppo_steps=2,
        dpo_iter_rounds=1,
    )
    st.main(args)
    results = json.loads((tmp_path / "results.json").read_text())
    assert json.loads((tmp_path / "args.json").read_text())["seeds"] == [0, 1]
    assert (tmp_path / "synthetic_toy.png").stat().st_size > 0
    assert set(results["claim"]["rate"]) == {"a", "b", "c", "all"}
    assert [set(r["claim"]) for r in results["runs"]] == [{"a", "b", "c"}] * 2
    assert set(results["summary"]) == {"pi_ref", "DPO", "PPO", "DPO-Iter", "Eq. 8 (r_phi)"}
    out = capsys.readouterr().out
    assert "Table 1" in out and "claim holds on a fraction of seeds" in out


# Paper claim (Sec. 4.2) with the default config, mean over held-out seeds 400-404: the first five
# of the block 400-419 on which the default reward normalization was validated after being chosen
# on seeds 0-4 (docs/synthetic_toy.md). DPO-Iter is off: it runs after DPO and PPO, so their results
# are unchanged. Without the normalization PPO keeps 0.25 of its mass on uncovered cells here.
def test_paper_claim_default_config_heldout_seeds():
    args = st.Args(dpo_iter_rounds=0, seeds=[400, 401, 402, 403, 404])
    assert args.ref_policy == "covered" and args.reward_normalization
    s, claim = st.summarize([st.run_seed(args, seed) for seed in args.seeds])
    unc = {k: v["uncovered_mass"]["mean"] for k, v in s.items()}
    diag = {k: v["diag_prob"]["mean"] for k, v in s.items()}
    assert unc["DPO"] > unc["pi_ref"]
    assert unc["DPO"] > unc["PPO"] + 0.2
    assert diag["PPO"] > diag["DPO"] + 0.2
    assert unc["PPO"] < 0.1
    assert claim["rate"]["all"] >= 0.6


def test_the_readmes_figure_is_what_the_script_draws_today(tmp_path):
    """docs/synthetic_toy.png (embedded in the README) is seed 0 of the default run, drawn by today's
    plot_figure1; after a change, regenerate it with `python synthetic_toy.py` and copy
    outputs/synthetic_toy/synthetic_toy.png to docs/."""
    import matplotlib.image

    args = st.Args()
    st.plot_figure1(st.run_seed(args, args.seeds[0]), str(tmp_path / "fig.png"), args.rise_tol)
    drawn = matplotlib.image.imread(tmp_path / "fig.png")
    committed = matplotlib.image.imread(REPO / "docs" / "synthetic_toy.png")
    assert drawn.shape == committed.shape and (drawn == committed).all(), (
        "docs/synthetic_toy.png is stale"
    )


def test_help_says_what_the_script_does(capsys):
    """--help (in-process: tyro prints it and exits) names the experiment and an offline example."""
    help_text = tyro_help(st.Args, capsys)
    assert "Table 1 and 8x8 synthetic experiment" in help_text
    assert "python synthetic_toy.py --seeds 300 301 302" in help_text
    assert "--output_dir" in help_text
