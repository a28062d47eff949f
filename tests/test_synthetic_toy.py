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


def test_reference_mle_covers_pairs_only():
    g = torch.Generator().manual_seed(0)
    _, _, _, covered = st.make_preference_data(8, 8, 2, g)
    torch.manual_seed(0)
    ref = st.make_mlp(8, 32, 8)
    st.train_reference_mle(ref, covered, 200, 1e-2)
    with torch.no_grad():
        p = st.all_log_probs(ref, 8).exp()
    # uniform over the 3 covered responses of each prompt (diagonal not favoured), uncovered low but > 0
    assert torch.allclose(p[covered].view(8, 3), torch.full((8, 3), 1 / 3), atol=0.01)
    assert (p[~covered] > 0).all() and p[~covered].max().item() < 0.01


# Paper claim (Sec. 4.2) with the default config (ref_policy=covered), mean over held-out seeds
# 100-104, which no hyper-parameter choice used (the old tuning used seeds 0-4). DPO-Iter is off: it
# runs after DPO and PPO, so their results are unchanged. Per seed it holds on only 3 of these 5
# seeds, and on 200-204 only by about 0.015 on the mean (docs/synthetic_toy.md).
def test_paper_claim_default_config_heldout_seeds():
    args = st.Args(dpo_iter_rounds=0, seeds=[100, 101, 102, 103, 104])
    assert args.ref_policy == "covered"
    s = st.summarize([st.run_seed(args, seed) for seed in args.seeds])
    unc = {k: v["uncovered_mass"]["mean"] for k, v in s.items()}
    diag = {k: v["diag_prob"]["mean"] for k, v in s.items()}
    assert unc["DPO"] > unc["pi_ref"]
    assert unc["DPO"] > unc["PPO"]
    assert diag["PPO"] > diag["DPO"]
