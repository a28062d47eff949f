"""Xu et al. 2024, "Is DPO Superior to PPO for LLM Alignment?": the Table 1 counterexample and the
8x8 synthetic experiment (Sec. 4.1-4.2, Figure 1).
1. Table 1: a stateless bandit, pi_ref = (0.5, 0.5, 0), one pair y1 > y2. DPO (Eq. 7) reaches its
   minimum with 0.9 on y3, which the data never saw; the KL-regularized RL optimum (Eq. 5/8) keeps
   y3 at zero for any reward (Theorem 4.1).
2. Sec. 4.2: 8 prompts x 8 responses, y = x optimal (the diagonal). MLPs on one-hot prompts: pi_ref
   fit to the responses the pairs cover; DPO on the pairs; a Bradley-Terry reward model (Eq. 4),
   normalized under pi_ref, then PPO with a KL penalty to pi_ref (Eq. 2); DPO-Iter. The claim, per
   seed: DPO puts more mass than (a) pi_ref and (b) PPO on uncovered cells; (c) PPO more on the
   diagonal than DPO.

Run: python synthetic_toy.py   (CPU, offline, ~10 s; writes results.json, args.json, a PNG)
     python synthetic_toy.py --seeds $(seq 300 319)   (the 20-seed claim table)
"""

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
import tyro
from torch import nn


@dataclass
class Args:
    """The paper's Table 1 and 8x8 synthetic experiment (Sec. 4.1-4.2), on CPU, offline.
    Example: python synthetic_toy.py --seeds 300 301 302 --output_dir outputs/synthetic_toy"""

    output_dir: str = "outputs/synthetic_toy"
    """where results.json, args.json and synthetic_toy.png are written"""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    """one full run (data, models, training) per seed; the figure shows the first seed"""
    beta: float = 0.1
    """KL coefficient of Eq. 2, shared by DPO (Eq. 7), the PPO KL penalty and Table 1"""
    num_prompts: int = 8
    """number of discrete prompts (paper: 8)"""
    num_responses: int = 8
    """number of discrete responses (paper: 8); response y = x is optimal for prompt x"""
    pairs_per_prompt: int = 2
    """preference pairs per prompt: chosen = the diagonal, rejected = a distinct random other"""
    hidden_size: int = 32
    """width of the one-hidden-layer MLPs (policy, reference, reward model)"""
    # reference policy
    ref_policy: Literal["untrained", "covered"] = "covered"
    """'untrained': the initialized MLP (near uniform); 'covered': that MLP fit by maximum likelihood
    to the responses of each prompt's pairs, chosen and rejected alike. Every policy starts from it"""
    ref_steps: int = 200
    """--ref_policy covered: full-batch Adam steps of the maximum-likelihood fit of pi_ref"""
    ref_learning_rate: float = 1e-2
    """--ref_policy covered: Adam learning rate of that fit"""
    dpo_steps: int = 300
    """full-batch Adam steps of DPO (Eq. 7) on the preference pairs"""
    dpo_learning_rate: float = 1e-2
    """Adam learning rate of DPO and DPO-Iter"""
    rm_steps: int = 300
    """full-batch Adam steps of the Bradley-Terry reward model (Eq. 3-4)"""
    rm_learning_rate: float = 1e-2
    """Adam learning rate of the reward model"""
    rm_weight_decay: float = 0.0
    """decoupled weight decay (AdamW) of the reward model"""
    reward_normalization: bool = True
    """shift and scale the learned reward to mean 0, std 1 under pi_ref before PPO (Ziegler et al.
    2019, Sec. 2.2), so that the KL coefficient acts on a fixed reward scale"""
    # PPO (Eq. 2 with r = r_phi)
    ppo_steps: int = 100
    """PPO iterations; each samples a fresh batch from the current policy"""
    ppo_kl_coef: float | None = None
    """KL penalty coefficient of PPO; None uses --beta (the paper uses one beta for both)"""
    ppo_learning_rate: float = 1e-2
    """Adam learning rate of PPO"""
    ppo_samples_per_prompt: int = 32
    """responses sampled per prompt per PPO iteration (batch = num_prompts * this)"""
    ppo_epochs: int = 4
    """optimization epochs over each sampled batch"""
    ppo_num_minibatches: int = 4
    """minibatches per epoch"""
    ppo_clip: float = 0.2
    """clip range epsilon of the ratio objective"""
    # DPO-Iter (paper Sec. 4.3, beyond Sec. 4.2)
    dpo_iter_rounds: int = 3
    """rounds of iterative DPO (0 disables it); each round's reference is the previous policy"""
    dpo_iter_pairs_per_prompt: int = 8
    """pairs per prompt per round: two sampled responses, the higher learned reward wins"""
    rise_tol: float = 0.01
    """an uncovered cell 'rose above pi_ref' when pi(y|x) > pi_ref(y|x) + rise_tol"""


# ---- the math, as small pure functions ----


def table1_dpo_loss(a: float, b: float, beta: float) -> float:
    """Sec. 4.1: DPO loss of the 3-action example with pi_ref = (0.5, 0.5, 0), pair y1 > y2,
    pi(y1) = a, pi(y2) = b. Eq. 7 reduces to log(1 + (b / a)^beta) since pi_ref(y1) = pi_ref(y2)."""
    return math.log1p((b / a) ** beta)


def rl_optimal_policy(pi_ref: torch.Tensor, reward: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. 5/8: pi_ref(y|x) exp(r(x,y) / beta) / Z(x), in log space: pi_ref = 0 stays exactly 0."""
    return torch.softmax(torch.log(pi_ref) + reward / beta, dim=-1)


def dpo_loss(logp_w, logp_l, ref_logp_w, ref_logp_l, beta: float) -> torch.Tensor:
    """Eq. 7: -log sigmoid(beta * (log pi/pi_ref (y_w) - log pi/pi_ref (y_l))), mean over pairs."""
    margin = (logp_w - ref_logp_w) - (logp_l - ref_logp_l)
    return -F.logsigmoid(beta * margin).mean()


def bt_loss(r_w: torch.Tensor, r_l: torch.Tensor) -> torch.Tensor:
    """Eq. 4: Bradley-Terry negative log-likelihood -log sigmoid(r(x, y_w) - r(x, y_l)), mean."""
    return -F.logsigmoid(r_w - r_l).mean()


def normalize_reward(reward: torch.Tensor, pi_ref: torch.Tensor) -> torch.Tensor:
    """Ziegler et al. 2019, Sec. 2.2: an affine map of r to mean 0 and variance 1 over prompts x
    (uniform) and responses y ~ pi_ref(.|x). Keeps every ranking; fixes the scale beta acts on."""
    w = pi_ref / pi_ref.shape[0]
    mean = (w * reward).sum()
    return (reward - mean) / (w * (reward - mean) ** 2).sum().sqrt()


def ppo_clip_objective(logp_new, logp_old, advantages, clip: float) -> torch.Tensor:
    """PPO's clipped surrogate (to maximize): mean of min(ratio * A, clip(ratio, 1-eps, 1+eps) * A)."""
    ratio = torch.exp(logp_new - logp_old)
    return torch.min(ratio * advantages, torch.clamp(ratio, 1 - clip, 1 + clip) * advantages).mean()


def whiten(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Advantage normalization (paper Sec. 5): zero mean, unit std over the batch."""
    return (x - x.mean()) / (x.std() + eps)


def coverage_metrics(pi, pi_ref, covered, rise_tol: float) -> dict:
    """pi, pi_ref: [prompts, responses] probabilities; covered: cells in the data. Mean over prompts
    of pi(x|x) and of the mass on uncovered cells; uncovered cells with pi > pi_ref + rise_tol."""
    return {
        "diag_prob": pi.diagonal().mean().item(),
        "uncovered_mass": (pi * ~covered).sum(-1).mean().item(),
        "n_uncovered_up": int(((pi > pi_ref + rise_tol) & ~covered).sum().item()),
    }


def claim_parts(metrics: dict) -> dict:
    """The Sec. 4.2 claim on one seed: (a) DPO's uncovered mass > pi_ref's, (b) DPO's > PPO's,
    (c) PPO's diagonal mass > DPO's."""
    u, d = ({k: m[key] for k, m in metrics.items()} for key in ("uncovered_mass", "diag_prob"))
    return {"a": u["DPO"] > u["pi_ref"], "b": u["DPO"] > u["PPO"], "c": d["PPO"] > d["DPO"]}


# ---- data and models: preference pairs whose chosen response is the diagonal; MLPs ----


def make_preference_data(num_prompts, num_responses, pairs_per_prompt, generator):
    """Sec. 4.2: for each prompt x the optimal (chosen) response is y = x; the rejected responses are
    `pairs_per_prompt` distinct random others. Returns (prompts, chosen, rejected, covered mask)."""
    prompts, rejected = [], []
    for x in range(num_prompts):
        others = [y for y in range(num_responses) if y != x]
        pick = torch.randperm(len(others), generator=generator)[:pairs_per_prompt]
        rejected += [others[i] for i in pick.tolist()]
        prompts += [x] * len(pick)
    prompts, rejected = torch.tensor(prompts), torch.tensor(rejected)
    covered = torch.eye(num_prompts, num_responses, dtype=torch.bool)
    covered[prompts, rejected] = True
    return prompts, prompts.clone(), rejected, covered


def make_mlp(n_in: int, hidden: int, n_out: int) -> nn.Module:
    """One-hot prompt -> hidden -> one output per response: logits (policy) or rewards (reward)."""
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


def all_log_probs(policy: nn.Module, num_prompts: int) -> torch.Tensor:
    """log pi(y|x) for every cell, [prompts, responses]."""
    return torch.log_softmax(policy(torch.eye(num_prompts)), dim=-1)


# ---- training: full-batch fits (pi_ref, DPO, reward model), PPO, DPO-Iter ----


def fit(model: nn.Module, loss_fn, steps: int, lr: float, weight_decay: float = 0.0) -> float:
    """Full-batch AdamW on loss_fn(model) for `steps` steps; returns the last loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = loss_fn(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def train_dpo(policy, ref_logps, prompts, chosen, rejected, beta, steps, lr) -> float:
    """Eq. 7, full batch. ref_logps: [prompts, responses] log pi_ref, precomputed (frozen)."""

    def loss_fn(model):
        lp = all_log_probs(model, ref_logps.shape[0])
        w, lo = (prompts, chosen), (prompts, rejected)
        return dpo_loss(lp[w], lp[lo], ref_logps[w], ref_logps[lo], beta)

    return fit(policy, loss_fn, steps, lr)


def train_ppo(policy, ref_logps, rewards, kl_coef: float, args: Args, generator) -> None:
    """PPO on the bandit (Eq. 2, r = r_phi): sample y ~ pi_old per prompt, score r(x,y) - kl_coef *
    (log pi_old - log pi_ref)(y|x), whiten over the batch, epochs of the clipped objective."""
    n_prompts = ref_logps.shape[0]
    opt = torch.optim.Adam(policy.parameters(), lr=args.ppo_learning_rate)
    x = torch.arange(n_prompts).repeat_interleave(args.ppo_samples_per_prompt)
    mb = len(x) // args.ppo_num_minibatches
    for _ in range(args.ppo_steps):
        # ---- rollout ----
        with torch.no_grad():
            old_logps_all = all_log_probs(policy, n_prompts)
            y = torch.multinomial(old_logps_all.exp()[x], 1, generator=generator).squeeze(-1)
            logp_old = old_logps_all[x, y]
            kl = logp_old - ref_logps[x, y]
            score = rewards[x, y]
            adv = whiten(score - kl_coef * kl)
        # ---- optimize ----
        for _ in range(args.ppo_epochs):
            perm = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), mb):
                idx = perm[start : start + mb]
                logp_new = all_log_probs(policy, n_prompts)[x[idx], y[idx]]
                loss = -ppo_clip_objective(logp_new, logp_old[idx], adv[idx], args.ppo_clip)
                opt.zero_grad()
                loss.backward()
                opt.step()


def train_dpo_iter(policy, ref_logps, rewards, args: Args, generator) -> None:
    """DPO-Iter (paper Sec. 4.3): each round samples two responses per pair from the current policy,
    labels them with the learned reward model, and runs DPO against the previous round's policy."""
    n_prompts = ref_logps.shape[0]
    cur_ref = ref_logps
    for _ in range(args.dpo_iter_rounds):
        x = torch.arange(n_prompts).repeat_interleave(args.dpo_iter_pairs_per_prompt)
        probs = cur_ref.exp()[x]
        y1 = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        y2 = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        r1, r2 = rewards[x, y1], rewards[x, y2]
        keep = r1 != r2  # ties dropped
        x, w, lo = x[keep], torch.where(r1 > r2, y1, y2)[keep], torch.where(r1 > r2, y2, y1)[keep]
        train_dpo(policy, cur_ref, x, w, lo, args.beta, args.dpo_steps, args.dpo_learning_rate)
        with torch.no_grad():
            cur_ref = all_log_probs(policy, n_prompts)


def run_seed(args: Args, seed: int) -> dict:
    """One full run of Sec. 4.2 for one seed. Returns the matrices, the metrics and the claim."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    P, R = args.num_prompts, args.num_responses
    prompts, chosen, rejected, covered = make_preference_data(P, R, args.pairs_per_prompt, gen)

    # ---- pi_ref: the initialized MLP, or (covered) that MLP fit to the covered responses ----
    ref, ref_loss = make_mlp(P, args.hidden_size, R), None
    if args.ref_policy == "covered":
        target = covered.float() / covered.float().sum(-1, keepdim=True)
        ml_loss = lambda m: -(target * all_log_probs(m, P)).sum(-1).mean()
        ref_loss = fit(ref, ml_loss, args.ref_steps, args.ref_learning_rate)
    ref_state = {k: v.clone() for k, v in ref.state_dict().items()}
    with torch.no_grad():
        ref_logps = all_log_probs(ref, P)

    def fresh_policy():
        pol = make_mlp(P, args.hidden_size, R)
        pol.load_state_dict(ref_state)
        return pol

    # ---- DPO (Eq. 7) ----
    dpo = fresh_policy()
    dpo_final = train_dpo(
        dpo, ref_logps, prompts, chosen, rejected, args.beta, args.dpo_steps, args.dpo_learning_rate
    )

    # ---- reward model (Eq. 4), then PPO against it (Eq. 2) ----
    rm = make_mlp(P, args.hidden_size, R)

    def bt_fit_loss(model):
        r = model(torch.eye(P))
        return bt_loss(r[prompts, chosen], r[prompts, rejected])

    rm_loss = fit(rm, bt_fit_loss, args.rm_steps, args.rm_learning_rate, args.rm_weight_decay)
    with torch.no_grad():
        rewards = rm(torch.eye(P))
        if args.reward_normalization:
            rewards = normalize_reward(rewards, ref_logps.exp())
    kl_coef = args.beta if args.ppo_kl_coef is None else args.ppo_kl_coef
    ppo = fresh_policy()
    train_ppo(ppo, ref_logps, rewards, kl_coef, args, gen)

    # ---- DPO-Iter (beyond Sec. 4.2) ----
    policies = {"pi_ref": ref, "DPO": dpo, "PPO": ppo}
    if args.dpo_iter_rounds > 0:
        policies["DPO-Iter"] = fresh_policy()
        train_dpo_iter(policies["DPO-Iter"], ref_logps, rewards, args, gen)

    probs = {k: all_log_probs(m, P).exp().detach() for k, m in policies.items()}
    # Eq. 8 with the learned reward: the policy PPO reaches if it maximizes Eq. 2 exactly
    probs["Eq. 8 (r_phi)"] = rl_optimal_policy(probs["pi_ref"], rewards, kl_coef)
    metrics = {
        k: coverage_metrics(v, probs["pi_ref"], covered, args.rise_tol) for k, v in probs.items()
    }
    return {
        "seed": seed,
        "covered": covered.tolist(),
        "probs": {k: v.tolist() for k, v in probs.items()},
        "reward": rewards.tolist(),
        "metrics": metrics,
        "claim": claim_parts(metrics),
        "final_losses": {"dpo": dpo_final, "reward_model": rm_loss, "ref_mle": ref_loss},
    }


def main(args: Args) -> dict:
    start = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    Path(args.output_dir, "args.json").write_text(json.dumps(asdict(args), indent=1))
    print(format_table1(args.beta) + "\n")
    runs = [run_seed(args, s) for s in args.seeds]
    summary, claim = summarize(runs)
    print(format_results(runs, summary, claim, args))
    plot_figure1(runs[0], os.path.join(args.output_dir, "synthetic_toy.png"), args.rise_tol)
    results = {"args": asdict(args), "summary": summary, "claim": claim, "runs": runs}
    Path(args.output_dir, "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote results.json, args.json, synthetic_toy.png in {time.time() - start:.1f}s")
    return results


# ---- reporting ----


def mean_ci95(values: list[float]) -> dict:
    """Mean and the half-width of its 95% confidence interval: Student t, with the t quantile from
    the Cornish-Fisher expansion (Abramowitz & Stegun 26.7.5; within 0.005 for 10+ values)."""
    z, n = 1.959964, len(values)
    if n < 2:
        return {"mean": statistics.fmean(values), "ci95": math.nan}
    t = z + (z**3 + z) / (4 * (n - 1)) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * (n - 1) ** 2)
    return {"mean": statistics.fmean(values), "ci95": t * statistics.stdev(values) / math.sqrt(n)}


def summarize(runs: list[dict]) -> tuple[dict, dict]:
    """Mean and std (population, over seeds) of every metric of every policy; the claim: the rate of
    seeds on which each part (and all three) holds, and the paired difference behind each part."""
    stats = lambda v: {"mean": statistics.fmean(v), "std": statistics.pstdev(v)}
    names = runs[0]["metrics"]
    summary = {n: {k: stats([r["metrics"][n][k] for r in runs]) for k in names[n]} for n in names}
    rate = {p: statistics.fmean(r["claim"][p] for r in runs) for p in ("a", "b", "c")}
    rate["all"] = statistics.fmean(all(r["claim"].values()) for r in runs)
    diff = lambda p, q, k: mean_ci95([r["metrics"][p][k] - r["metrics"][q][k] for r in runs])
    return summary, {
        "rate": rate,
        "a: DPO - pi_ref uncovered": diff("DPO", "pi_ref", "uncovered_mass"),
        "b: DPO - PPO uncovered": diff("DPO", "PPO", "uncovered_mass"),
        "c: PPO - DPO diagonal": diff("PPO", "DPO", "diag_prob"),
    }


def format_table1(beta: float) -> str:
    """The paper's Table 1, with the DPO loss of each row: the pi_DPO row (the paper's third) reaches
    the minimum (0) with 0.9 on y3; the RL optimum (Eq. 5/8) keeps y3 at 0 for any reward."""
    pi_ref = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    ppo = lambda r: rl_optimal_policy(pi_ref, torch.tensor(r).double(), beta).tolist()
    rows = {"pi_ref": pi_ref.tolist(), "pi_DPO": [0.1, 0.0, 0.9]}
    rows |= {"pi_PPO (r=(10,0,0))": ppo([10, 0, 0]), "pi_PPO (r=(10,0,100))": ppo([10, 0, 100])}
    lines = [f"Table 1 (Sec. 4.1), beta={beta}: D_pref = {{(y_w = y1, y_l = y2)}}"]
    lines.append(f"{'Action':<22}{'y1':>8}{'y2':>8}{'y3':>8}   L_DPO = log(1+(b/a)^beta)")
    for name, (a, b, c) in rows.items():
        lines.append(f"{name:<22}{a:>8.3f}{b:>8.3f}{c:>8.3f}   {table1_dpo_loss(a, b, beta):.4f}")
    lines.append("min L_DPO = 0 (b = 0); pi_DPO reaches it with 0.9 on y3, never seen in D_pref.")
    lines.append("Eq. 5/8: pi_ref(y3) = 0 => pi_PPO(y3) = 0 for any reward, even r(y3) = 100.")
    return "\n".join(lines)


def format_results(runs: list[dict], summary: dict, claim: dict, args: Args) -> str:
    """Mean +- std of each policy's metrics; one line per seed with the masses and the claim parts
    that hold; the rates and the paired differences with their 95% CI."""
    n_unc = args.num_prompts * (args.num_responses - 1 - args.pairs_per_prompt)
    lines = [f"Sec. 4.2, {n_unc} uncovered cells, mean +- std over {len(runs)} seeds",
             f"{'policy':<14}{'P(diagonal)':>18}{'P(uncovered)':>18}{'#uncovered up':>18}"]  # fmt: skip
    for name, m in summary.items():
        cells = [f"{m[k]['mean']:.3f} +- {m[k]['std']:.3f}" for k in m]
        lines.append(f"{name:<14}" + "".join(f"{c:>18}" for c in cells))
    lines.append(f"#uncovered up: uncovered cells with pi > pi_ref + {args.rise_tol}\n")
    lines.append("seed  P(unc): pi_ref   DPO    PPO  P(diag): DPO   PPO  claim (a) (b) (c)")
    for r in runs:
        m, yn = r["metrics"], "   ".join("Y" if v else "n" for v in r["claim"].values())
        vals = [m[k]["uncovered_mass"] for k in ("pi_ref", "DPO", "PPO")]
        vals += [m[k]["diag_prob"] for k in ("DPO", "PPO")]
        lines.append(f"{r['seed']:<8}" + "".join(f"{v:7.3f}" for v in vals) + f"        {yn}")
    lines.append("claim holds on a fraction of seeds: " + str(claim["rate"]))
    for k, v in list(claim.items())[1:]:
        lines.append(f"{k}: {v['mean']:+.3f} +- {v['ci95']:.3f} (mean, 95% CI over seeds)")
    return "\n".join(lines)


def plot_figure1(run: dict, path: str, rise_tol: float) -> None:
    """Figure 1 style: coverage, pi_ref, pi_PPO, pi_DPO, learned reward. Policy panels circle the
    uncovered cells whose probability rose above pi_ref; the reward panel circles uncovered cells
    whose learned reward exceeds that of the prompt's optimal (diagonal) response."""
    covered = torch.tensor(run["covered"])
    pi_ref, reward = torch.tensor(run["probs"]["pi_ref"]), torch.tensor(run["reward"])
    panels = [
        ("pi_ref", pi_ref, torch.zeros_like(covered)),
        ("pi_PPO", torch.tensor(run["probs"]["PPO"]), None),
        ("pi_DPO", torch.tensor(run["probs"]["DPO"]), None),
        ("learned reward", reward, (reward > reward.diagonal()[:, None]) & ~covered),
    ]
    fig, axes = plt.subplots(1, 5, figsize=(22, 5.2))
    axes[0].imshow(covered.float().numpy(), cmap="Greys", vmin=0, vmax=1.6)
    for ax, (title, mat, circled) in zip(axes[1:], panels):
        circled = (mat > pi_ref + rise_tol) & ~covered if circled is None else circled
        rw = title == "learned reward"
        image = ax.imshow(mat.numpy(), cmap="coolwarm" if rw else "viridis")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, label="r(x, y)" if rw else "prob.")
        light = rw | (mat - mat.min() > 0.6 * (mat.max() - mat.min()))  # dark text on light cells
        for i, j in torch.cartesian_prod(*map(torch.arange, mat.shape)).tolist():
            color = "black" if light[i, j] else "white"
            ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=8, color=color)
            if circled[i, j]:
                ax.add_patch(plt.Circle((j, i), 0.45, fill=False, edgecolor="red", linewidth=2))
    for ax, title in zip(axes, ["coverage (grey: pair in the data)"] + [p[0] for p in panels]):
        ax.set(title=title, xlabel="response y", ylabel="prompt x", xticks=range(8))
        ax.set_yticks(range(8))
    label = f"uncovered cell: policy > pi_ref + {rise_tol}; reward > the diagonal's"
    axes[4].scatter([], [], s=200, facecolors="none", edgecolors="red", linewidths=2, label=label)
    fig.legend(loc="lower center", frameon=False, fontsize=11)
    fig.suptitle(f"seed {run['seed']}: the paper's Figure 1 on the 8x8 task", fontsize=13)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # tiny models: more threads cost time (3 min instead of 10 s)
    main(tyro.cli(Args))
