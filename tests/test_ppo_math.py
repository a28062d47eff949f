"""Unit tests of ppo.py's pure functions against independent, hand-written (per-element) references."""

import math
import statistics
from types import SimpleNamespace

import pytest
import torch
from conftest import build_sentencepiece_tokenizer

import ppo

# Two responses of 4 and 2 tokens in a width of 5; the values after each response's end are garbage
# that GAE must ignore.
MASK = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
REWARDS = torch.tensor([[0.1, -0.2, 0.3, 1.5, 9.0], [-0.5, 2.0, 7.0, 7.0, 7.0]])
VALUES = torch.tensor([[0.4, 0.1, -0.3, 0.8, 5.0], [0.2, -0.6, 3.0, 3.0, 3.0]])


def gae_reference(rewards, values, length, gamma, lam):
    """A_t = sum_k (gamma lam)^k delta_{t+k}, delta_t = r_t + gamma V_{t+1} - V_t, V after the end = 0."""
    deltas = []
    for t in range(length):
        next_value = values[t + 1] if t + 1 < length else 0.0
        deltas.append(rewards[t] + gamma * next_value - values[t])
    advantages = [
        sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, length)) for t in range(length)
    ]
    returns = [a + values[t] for t, a in enumerate(advantages)]
    return advantages, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.8), (0.99, 0.0)])
def test_gae_matches_the_definition_and_ignores_values_after_eos(gamma, lam):
    advantages, returns = ppo.compute_gae(REWARDS, VALUES, MASK, gamma, lam)
    for b in range(2):
        n = int(MASK[b].sum())
        ref_adv, ref_ret = gae_reference(REWARDS[b].tolist(), VALUES[b].tolist(), n, gamma, lam)
        assert advantages[b, :n].tolist() == pytest.approx(ref_adv, abs=1e-6)
        assert returns[b, :n].tolist() == pytest.approx(ref_ret, abs=1e-6)
        assert advantages[b, n:].abs().sum() == 0 and returns[b, n:].abs().sum() == 0
    # garbage after EOS changes nothing
    garbage = VALUES.clone()
    garbage[MASK == 0] = -100.0
    assert torch.allclose(ppo.compute_gae(REWARDS, garbage, MASK, gamma, lam)[0], advantages)


def test_gae_with_gamma_lambda_one_is_return_to_go_minus_value():
    advantages, _ = ppo.compute_gae(REWARDS, VALUES, MASK, 1.0, 1.0)
    r, v = REWARDS[0].tolist(), VALUES[0].tolist()
    assert advantages[0, 1].item() == pytest.approx(r[1] + r[2] + r[3] - v[1], abs=1e-6)


def test_rewards_score_on_last_real_token_and_kl_penalty_on_every_response_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0], [-0.1, -0.2, -9.0, -9.0, -9.0]])
    ref = torch.tensor([[-1.2, -1.0, -0.5, -2.0, -4.0], [-0.3, -0.1, -1.0, -1.0, -1.0]])
    scores = torch.tensor([3.0, -50.0])
    rewards, kl, non_score = ppo.compute_rewards(scores, logp, ref, MASK, 0.1, reward_clip=20.0)
    for b in range(2):
        n = int(MASK[b].sum())
        for t in range(5):
            if t >= n:
                assert rewards[b, t].item() == 0 and kl[b, t].item() == 0
                continue
            lp, rp = logp[b, t].item(), ref[b, t].item()
            k = lp - rp  # k1
            expected = -0.1 * k + (max(-20.0, min(20.0, scores[b].item())) if t == n - 1 else 0.0)
            assert rewards[b, t].item() == pytest.approx(expected, abs=1e-5)
            assert non_score[b, t].item() == pytest.approx(-0.1 * k, abs=1e-5)
    assert rewards[1, 1].item() == pytest.approx(
        -20.0 - 0.1 * kl[1, 1].item(), abs=1e-5
    )  # clipped to -20


def hand_mean_var(x, mask):
    vals = [x[b][t] for b in range(len(x)) for t in range(len(x[b])) if mask[b][t]]
    return statistics.fmean(vals), statistics.pvariance(vals)


def sum_masked(x):
    return sum(x[b, t].item() for b in range(x.shape[0]) for t in range(x.shape[1]) if MASK[b, t])


def test_masked_mean_and_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0], [5.0, -3.0, 100.0, 100.0, 100.0]])
    mean, var = hand_mean_var(x.tolist(), MASK.tolist())
    assert ppo.masked_mean(x, MASK).item() == pytest.approx(mean)
    assert ppo.masked_var(x, MASK).item() == pytest.approx(var)
    w = ppo.masked_whiten(x, MASK)
    w_keep = ppo.masked_whiten(x, MASK, shift_mean=False)
    for b in range(2):
        for t in range(5):
            if MASK[b, t]:
                assert w[b, t].item() == pytest.approx(
                    (x[b, t].item() - mean) / math.sqrt(var + 1e-8), abs=1e-5
                )
                assert w_keep[b, t].item() == pytest.approx(
                    (x[b, t].item() - mean) / math.sqrt(var + 1e-8) + mean, abs=1e-5
                )
            else:
                assert w[b, t].item() == 0
    # `reduce` sums over processes: the other process's (sum, count) added in gives the global mean
    other = torch.tensor([10.0, 2.0])  # another process holding the values 4 and 6
    assert ppo.masked_mean(x, MASK, reduce=lambda t: t + other).item() == pytest.approx(
        (sum_masked(x) + 10) / 8
    )


def test_advantage_whitening_switch():
    raw, returns = ppo.compute_gae(REWARDS, VALUES, MASK, 1.0, 1.0)
    off, returns_off = ppo.compute_advantages(REWARDS, VALUES, MASK, 1.0, 1.0, whiten=False)
    on, returns_on = ppo.compute_advantages(REWARDS, VALUES, MASK, 1.0, 1.0, whiten=True)
    assert torch.equal(off, raw)  # whitening off: the raw GAE advantages
    assert torch.equal(returns_off, returns) and torch.equal(
        returns_on, returns
    )  # returns never whitened
    assert not torch.allclose(on, raw)
    assert ppo.masked_mean(on, MASK).item() == pytest.approx(0.0, abs=1e-6)
    assert ppo.masked_var(on, MASK).item() == pytest.approx(1.0, abs=1e-4)


def test_running_mean_std_equals_statistics_of_all_returns_seen():
    torch.manual_seed(0)
    rms, seen = ppo.RunningMeanStd(), []
    for n in (3, 7, 1, 12):
        x = torch.randn(2, n) * 3 + 2
        mask = torch.ones(2, n, dtype=torch.long)
        mask[1, n // 2 :] = 0
        rms.update(x, mask)
        seen += [x[b, t].item() for b in range(2) for t in range(n) if mask[b, t]]
        assert rms.mean == pytest.approx(statistics.fmean(seen), abs=1e-5)
        assert rms.var == pytest.approx(statistics.pvariance(seen), abs=1e-4)
        assert rms.count == len(seen)
    state = rms.state_dict()
    fresh = ppo.RunningMeanStd()
    fresh.load_state_dict(state)
    assert fresh.std == pytest.approx(math.sqrt(statistics.pvariance(seen)), abs=1e-4)


def test_policy_loss_is_the_clipped_surrogate():
    new = torch.tensor(
        [[-1.0, -0.5, -2.0, -0.1, 0.0], [-0.3, -1.0, 0.0, 0.0, 0.0]], requires_grad=True
    )
    old = torch.tensor([[-1.2, -0.5, -1.0, -0.4, 0.0], [-0.3, -1.5, 0.0, 0.0, 0.0]])
    adv = torch.tensor([[1.0, -2.0, 0.5, -1.0, 9.0], [2.0, 1.0, 9.0, 9.0, 9.0]])
    loss, stats = ppo.policy_loss(new, old, adv, MASK, 0.2)
    terms, clipped = [], 0
    for b in range(2):
        for t in range(int(MASK[b].sum())):
            ratio = math.exp(new[b, t].item() - old[b, t].item())
            a = adv[b, t].item()
            unclipped_obj, clipped_obj = ratio * a, min(max(ratio, 0.8), 1.2) * a
            terms.append(-min(unclipped_obj, clipped_obj))
            clipped += clipped_obj < unclipped_obj
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(clipped / len(terms))
    assert 0 < clipped < len(terms)
    loss_global, _ = ppo.policy_loss(new, old, adv, MASK, 0.2, n_tokens=torch.tensor(12.0))
    assert loss_global.item() == pytest.approx(sum(terms) / 12, abs=1e-6)
    loss.backward()
    assert new.grad[MASK == 0].abs().sum() == 0


def test_value_loss_is_clipped_around_the_rollout_values():
    new = torch.tensor([[0.5, 2.0, -1.0, 0.0, 7.0], [0.0, 1.0, 7.0, 7.0, 7.0]])
    old = torch.tensor([[0.4, 1.0, -0.5, 0.0, 0.0], [0.5, 1.0, 0.0, 0.0, 0.0]])
    ret = torch.tensor([[1.0, 3.0, -2.0, 0.1, 0.0], [-1.0, 0.0, 0.0, 0.0, 0.0]])
    loss, stats = ppo.value_loss(new, old, ret, MASK, 0.2)
    terms, clipped = [], 0
    for b in range(2):
        for t in range(int(MASK[b].sum())):
            v, v_old, g = new[b, t].item(), old[b, t].item(), ret[b, t].item()
            v_clip = min(max(v, v_old - 0.2), v_old + 0.2)
            terms.append(0.5 * max((v - g) ** 2, (v_clip - g) ** 2))
            clipped += (v_clip - g) ** 2 > (v - g) ** 2
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(clipped / len(terms))
    assert 0 < clipped < len(terms)


def test_reference_ema_update():
    torch.manual_seed(0)
    policy, ref = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    ppo.ema_update(ref, policy, 0.0)
    assert all(
        torch.equal(before[k], v) for k, v in ref.state_dict().items()
    )  # ref_ema = 0: untouched
    ppo.ema_update(ref, policy, 0.25)
    for name, value in ref.state_dict().items():
        p, r0 = policy.state_dict()[name], before[name]
        for i in range(value.numel()):
            expected = 0.75 * r0.flatten()[i].item() + 0.25 * p.flatten()[i].item()
            assert value.flatten()[i].item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError):
        ppo.ema_update(ref, torch.nn.Linear(3, 2, bias=False), 0.1)


def test_truncate_after_eos_and_missing_eos_penalty():
    eos, pad_id = 0, 9
    responses = torch.tensor([[5, 6, 0, 7, 0], [0, 3, 4, 5, 6], [1, 2, 3, 4, 5]])
    out, mask, has_eos = ppo.truncate_after_eos(responses, eos, pad_id)
    for b, row in enumerate(responses.tolist()):
        end = row.index(eos) if eos in row else len(row) - 1
        assert mask[b].tolist() == [1 if t <= end else 0 for t in range(5)]
        assert out[b].tolist() == [row[t] if t <= end else pad_id for t in range(5)]
        assert has_eos[b].item() == (eos in row)
    # pad == EOS (Pythia, Llama): the first EOS still ends the response
    _out2, mask2, _ = ppo.truncate_after_eos(torch.tensor([[4, 0, 0, 0]]), 0, 0)
    assert mask2.tolist() == [[1, 1, 0, 0]]
    scores = torch.tensor([1.0, 2.0, 3.0])
    assert ppo.apply_missing_eos_penalty(scores, has_eos, -10.0).tolist() == [1.0, 2.0, -10.0]
    assert ppo.apply_missing_eos_penalty(scores, has_eos, None).tolist() == [1.0, 2.0, 3.0]


def test_batch_arithmetic_follows_the_arguments():
    paper = SimpleNamespace(
        per_device_prompt_batch_size=64,
        samples_per_prompt=1,
        num_minibatches=4,
        per_device_train_batch_size=4,
        ppo_epochs=1,
        local_rollout_forward_batch_size=16,
    )
    sizes = ppo.derive_batch_sizes(paper, num_processes=8)
    assert sizes["rollout_batch_size"] == 512 and sizes["minibatch_size"] == 128  # paper App. A.2
    assert sizes["local_minibatch_size"] == 16 and sizes["gradient_accumulation_steps"] == 4
    small = SimpleNamespace(
        **{
            **vars(paper),
            "per_device_prompt_batch_size": 4,
            "samples_per_prompt": 2,
            "num_minibatches": 2,
            "per_device_train_batch_size": 2,
            "ppo_epochs": 3,
        }
    )
    sizes = ppo.derive_batch_sizes(small, num_processes=2)
    assert sizes["rollout_batch_size"] == 16 and sizes["minibatch_size"] == 8
    assert sizes["gradient_accumulation_steps"] == 2 and sizes["optimizer_steps_per_iteration"] == 6
    with pytest.raises(ppo.DataError, match="must split"):
        ppo.derive_batch_sizes(SimpleNamespace(**{**vars(paper), "num_minibatches": 3}), 1)
    with pytest.raises(ppo.DataError, match=">= 1"):
        ppo.derive_batch_sizes(SimpleNamespace(**{**vars(paper), "ppo_epochs": 0}), 1)


def test_reward_function_sees_a_sentencepiece_response_with_its_leading_space():
    """The prompt is left-padded, the response right-padded; the response's text is what follows the
    prompt (' Paris.'), not its tokens decoded alone ('Paris.')."""
    sp = build_sentencepiece_tokenizer()
    pad, eos = sp.pad_token_id, sp.eos_token_id
    prompt = sp("Capital of France?").input_ids
    response = sp(" Paris.", add_special_tokens=False).input_ids
    prompts = torch.tensor([[pad] + prompt])
    responses = torch.tensor([response + [eos, pad]])
    scorer = ppo.Scorer(
        SimpleNamespace(normalize_reward=False, local_rollout_forward_batch_size=1),
        sp,
        "cpu",
        reward_fn=len,
    )
    texts = scorer.texts(
        prompts, prompts != pad, responses, responses != pad, ["Capital of France?"]
    )
    assert texts == (["Capital of France?"], [" Paris."])
