import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
import synthetic_toy as st  # noqa: E402


def test_table1_dpo_loss_closed_form_and_eq7():
    assert st.table1_dpo_loss(0.5, 0.5, 0.1) == pytest.approx(math.log(2))
    assert st.table1_dpo_loss(0.1, 0.0, 0.1) == 0.0
    a, b, beta = 0.3, 0.2, 0.1
    expected = math.log(1 + (b / a) ** beta)
    got = st.dpo_loss(torch.tensor([math.log(a)]), torch.tensor([math.log(b)]),
                      torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.5)]), beta)
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
    loss = st.dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)


def test_bt_loss_hand_computed():
    assert st.bt_loss(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)


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


# Paper claim (Sec. 4.2), mean over the default seeds. In this implementation it does NOT reproduce:
# DPO puts LESS mass on uncovered cells than pi_ref (see docs/synthetic_toy.md). strict=True: if the
# claim starts holding, this test fails and the docs must be updated.
@pytest.mark.xfail(strict=True, reason="Sec. 4.2 claim does not reproduce with the default config")
def test_paper_claim_default_config():
    args = st.Args(dpo_iter_rounds=0)
    s = st.summarize([st.run_seed(args, seed) for seed in args.seeds])
    unc = {k: v["uncovered_mass"]["mean"] for k, v in s.items()}
    diag = {k: v["diag_prob"]["mean"] for k, v in s.items()}
    assert unc["DPO"] > unc["pi_ref"] and unc["DPO"] > unc["PPO"] and diag["PPO"] > diag["DPO"]
