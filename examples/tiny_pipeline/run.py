"""When does PPO beat DPO? A laptop-scale, pre-registered test of the paper's claim (PPO > DPO-Iter >
DPO; Xu et al. 2024, Table 4), with labellers of known accuracy and label budgets as an axis.

Task and gold reward: task.py (sort a digit string; graded partial credit in [-3, 1]). Every training
stage is one of the project's scripts (sft.py, reward_model.py, dpo.py, ppo.py), called through its
own `main(tyro.cli(Args, args=[...]))`, i.e. with exactly the command-line flags a user would type
(each stage's flags are in its log and in its `stage.json`).

Design (fixed before any reported seed runs; the primary contrasts are in preregistered.json):
1. Budgets: --budgets label budgets B of scored responses. PPO gets B rollouts scored by its labeller,
   DPO-Iter B sampled responses (--iterations rounds x prompts x --samples_per_prompt), DPO B/2 pairs.
   Schedules are constant (no warm-up, no decay to 0 inside a short run).
2. Arms (labeller x preference data), separating the causes the paper names (Sec. 4-5):
   - `gold`: the ground-truth reward (the code-task regime): PPO gets gold scores, DPO-Iter ranks its
     samples by gold, DPO gets B/2 corruption pairs labelled by gold.
   - `rm_d` (same preference data, the paper's HH-RLHF pipeline): D = B/2 pairs of SFT samples on the RL
     prompts with "human" Bradley-Terry labels (--bt_temperature). DPO trains on D; a reward model
     trained on the same D labels PPO's rollouts and DPO-Iter's samples. Coverage (Sec. 4): `dpo_corrupt`
     is DPO on B/2 corruption pairs (task.corrupt, off the SFT distribution) with the same labels' noise.
   - `rm_d_noisy`: as `rm_d`, with label noise on the pairs (Bradley-Terry temperature calibrated per
     seed to --noisy_accuracy on SFT-sample pairs), so the noise enters every method the same way: DPO
     through its pairs, PPO and DPO-Iter through a reward model trained on the same noisy pairs.
   - `rm_large` (same online budget): a reward model on --rm_large_pairs "human" pairs labels PPO and
     DPO-Iter, both at B scored responses; `dpo` here is DPO on that reward model's own pairs (the
     paper's DPO, independent of B); `dpo_iter_sft` is the ablation anchored to SFT in every round.
   DPO-Iter (`dpo_iter`) is the paper's: one dpo.py run of --iterations rounds, each round's reference
   the previous round's policy.
3. Metrics (test prompts, --eval_samples per prompt): sampled gold at temperature 1 (primary) and at
   the policy's temperature tuned on validation by its labeller, greedy gold, exact-answer rate,
   unfinished share, KL(policy || SFT). Baselines: SFT at a tuned temperature, best-of-N (N = 2, 4) of
   SFT samples picked by the arm's own labeller, and per seed the headroom: oracle best-of-2/4 and the
   KL-regularised optimum pi_SFT exp(r / 0.1) (r: gold, -1 if unfinished), from --headroom_samples SFT
   samples per prompt.
4. Tuning: the same grid size for every method (4 learning rates x 3 beta or kl_coef values, fixed
   up front); a choice on an edge extends the grid (up to --max_extensions times); each labeller picks
   each method's setting by its own validation score, per budget, on the --tuning_seeds.
5. Statistics: paired per-seed differences (same data, SFT and labellers for every method of a seed),
   95% t-intervals; the pre-registered primary contrasts get two-sided paired t-test p-values with
   Holm's correction across the family and simultaneous (Bonferroni) intervals; effects also as a
   share of the headroom (oracle best-of-4 - SFT).
6. The headroom gate (--gate): on the tuning seeds only, the best trained method at the largest budget
   must capture >= 40% of the way from SFT to oracle best-of-4 (sampled gold, validation prompts)
   before any reported seed runs; the full run refuses to start otherwise, or before preregistered.json
   is committed.

Outputs: results.json (shape: seeds, budgets, arms.<arm>.{labeller_accuracy, methods, budgets},
headroom, preregistered, holm, ablation), details.json, results.md, headroom.json (the gate), all
rewritten after every finished cell, so a long run can be committed in parts. Everything is
resumable: a finished cell (kind, labeller, budget, method, setting, seed) is never redone, and a stage
whose recorded settings differ from the wanted ones is redone. The committed results are enough to
resume from: a run whose work/ was lost writes back the finished cells from results.json,
details.json and headroom.json (`restore`) and prepares a seed (data, SFT, the reward models its jobs
need) only when one of its jobs must still run. `--estimate` prints the CPU cost plan.

    python examples/tiny_pipeline/run.py --estimate     # CPU-s of the whole design, from unit costs
    nice -n 19 python examples/tiny_pipeline/run.py --gate   # the headroom gate (tuning seeds only)
    python examples/tiny_pipeline/run.py                # the full study (work/ is git-ignored)
    python examples/tiny_pipeline/run.py --quick        # every stage at tiny sizes, into a temporary directory
"""

import hashlib
import importlib
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO)]

import task

ARMS = {  # arm -> the trained methods it runs
    "gold": ["dpo", "dpo_iter", "ppo"],
    "rm_d": ["dpo", "dpo_corrupt", "dpo_iter", "ppo"],
    "rm_d_noisy": ["dpo", "dpo_iter", "ppo"],
    "rm_large": ["dpo", "dpo_iter", "dpo_iter_sft", "ppo"],
}
NAMES = {
    "sft": "SFT",
    "dpo": "DPO",
    "dpo_corrupt": "DPO (corruption pairs)",
    "dpo_iter": "DPO-Iter",
    "dpo_iter_sft": "DPO-Iter (SFT-anchored)",
    "ppo": "PPO",
}
METRICS = [
    "gold_sampled",
    "gold_tuned_t",
    "temperature",
    "gold_greedy",
    "exact",
    "unfinished",
    "kl_to_sft",
]
BASELINES = ["sft_tuned_t", "best_of_2", "best_of_4"]
HEADROOM = ["sft", "best_of_2", "best_of_4", "oracle"]
# the pre-registered primary contrasts: (arm, x, y), each at every budget
PRIMARY = [
    ("rm_d", "ppo", "dpo"),
    ("rm_d", "ppo", "dpo_iter"),
    ("rm_large", "ppo", "dpo"),
    ("rm_large", "ppo", "dpo_iter"),
]
SECONDARY = [("gold", "ppo", "dpo"), ("gold", "ppo", "dpo_iter"), ("rm_d_noisy", "ppo", "dpo"),
             ("rm_d_noisy", "ppo", "dpo_iter"), ("rm_d", "dpo", "dpo_corrupt"), ("rm_large", "dpo_iter", "dpo_iter_sft")]  # fmt: skip
ABLATION = ["baseline", "adv_norm", "large_batch", "ref_ema"]
ABLATION_LABELS = {
    "baseline": "baseline PPO (small batch, no adv. norm.)",
    "adv_norm": "+ Adv. Norm.",
    "large_batch": "+ Large Batch (= PPO of the main table)",
    "ref_ema": "+ Ref. EMA",
}
PREREGISTERED = HERE / "preregistered.json"


@dataclass
class Args:
    """The tiny pipeline: SFT, reward model, DPO, DPO-Iter and PPO under labellers of known accuracy,
    on a digit-sorting task with a gold reward. Example: python examples/tiny_pipeline/run.py --quick"""

    output_dir: str | None = None
    """work directory (data, models, logs, per-cell results); default: examples/tiny_pipeline/work,
    or a new temporary directory with --quick"""
    results_dir: str | None = None
    """where results.json, details.json, results.md, headroom.json and the figure go; default:
    examples/tiny_pipeline, or <output_dir>/results with --quick"""
    quick: bool = False
    """every stage at tiny sizes (the test suite runs this); never writes into examples/tiny_pipeline/"""
    gate: bool = False
    """only the headroom gate: tuning seeds, headroom and the gold arm's tuning at the largest budget"""
    estimate: bool = False
    """print the CPU-s plan of the whole design (from measured unit costs) and stop"""
    restart: bool = False
    """discard a study with other settings in output_dir instead of refusing to touch it"""
    jobs: int = 2
    """worker processes (one CPU thread each)"""
    seeds: list[int] = field(default_factory=lambda: list(range(100, 120)))
    """reported seeds (fresh: none of 0-19 was ever looked at by this design)"""
    tuning_seeds: list[int] = field(default_factory=lambda: [0])
    """seeds of the hyper-parameter sweep and the headroom gate (never reported); one seed keeps the
    design near 12 CPU-h (three: 18 CPU-h, see --estimate)"""
    budgets: list[int] = field(default_factory=lambda: [2048, 16384])
    """label budgets: scored responses per method"""
    noisy_accuracy: float = 0.85
    """pairwise accuracy on SFT-sample pairs of the noisy pair labels (arm rm_d_noisy)"""
    # ---- task and models ----
    min_digits: int = 4
    max_digits: int = 12
    max_new_tokens: int = 16
    hidden_size: int = 64
    num_layers: int = 2
    num_sft: int = 4000
    sft_steps: int = 250
    sft_learning_rate: float = 2e-3
    # ---- reward models ----
    rm_num_layers: int = 4
    """layers of every reward model, which starts from an SFT model of its own (same data and steps)"""
    rm_large_pairs: int = 40000
    """"human" pairs of the large reward model (arm rm_large); half SFT-sample pairs, half corruptions"""
    rm_heldout: int = 1000
    bt_temperature: float = 0.1
    """the 'human' labels: P(a preferred) = sigmoid((gold(a) - gold(b)) / T)"""
    rm_epochs: float = 3.0
    rm_learning_rate: float = 1e-3
    # ---- the preference stages ----
    rl_prompts: int = 4096
    """the prompts PPO, DPO-Iter and DPO train on (>= max budget / 4)"""
    samples_per_prompt: int = 4
    """DPO-Iter samples per prompt and round (best vs worst by the labeller)"""
    iterations: int = 4
    """DPO-Iter rounds (paper Sec. 4.3: 4); each uses budget / (iterations x samples_per_prompt) prompts"""
    dpo_epochs: float = 2.0
    """passes over each DPO (and DPO-Iter round's) pair set; DPO on the large reward-model set: 1"""
    ppo_batch: int = 64
    """rollouts per PPO iteration (the ablation's small batch is a quarter of it)"""
    missing_eos_penalty: float = -1.0
    """score of an unfinished sample under the gold labeller (the empty answer's gold); under a reward
    model: its mean - 2 std on SFT samples"""
    ppo_lrs: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3])
    ppo_coefs: list[float] = field(default_factory=lambda: [0.03, 0.1, 0.3])
    """kl_coef values of PPO's grid"""
    dpo_lrs: list[float] = field(default_factory=lambda: [1e-5, 3e-5, 1e-4, 3e-4])
    dpo_coefs: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0])
    """beta values of the DPO, DPO-Iter grids"""
    max_extensions: int = 2
    """times a grid is extended past an edge that holds the chosen setting"""
    temperatures: list[float] = field(default_factory=lambda: [0.6, 0.8, 1.0])
    """sampling temperatures tuned on validation (by the labeller) for every policy and for SFT"""
    num_val: int = 200
    """validation prompts (labeller calibration, tuning, temperature)"""
    num_test: int = 300
    """test prompts (every reported number)"""
    val_samples: int = 4
    eval_samples: int = 16
    headroom_samples: int = 64
    gate_share: float = 0.4
    """the gate: share of the SFT -> oracle best-of-4 headroom the best trained method must reach"""


def quick_sizes(a: Args):
    a.seeds, a.tuning_seeds, a.budgets = a.seeds[:1], a.tuning_seeds[:1], [32, 64]
    a.max_digits, a.max_new_tokens, a.num_sft, a.sft_steps = 6, 8, 256, 20
    a.rm_large_pairs, a.rm_heldout, a.rm_epochs = 256, 32, 1.0
    a.rl_prompts, a.samples_per_prompt, a.iterations, a.dpo_epochs, a.ppo_batch = 16, 2, 2, 1.0, 16
    a.ppo_lrs, a.ppo_coefs, a.dpo_lrs, a.dpo_coefs = [3e-3], [0.1], [1e-3], [0.1]
    a.max_extensions, a.temperatures, a.num_val, a.num_test = 0, [0.7, 1.0], 16, 16
    a.val_samples, a.eval_samples, a.headroom_samples = 2, 2, 4


# ---- directories and recorded settings ----


class StudyError(Exception):
    pass


def study_settings(a: Args) -> dict:
    return {
        k: v
        for k, v in asdict(a).items()
        if k not in ("output_dir", "results_dir", "restart", "jobs", "gate", "estimate", "seeds")
    }


def prepare_dirs(a: Args):
    """Quick runs go to a temporary directory and never into examples/tiny_pipeline/; a work directory
    that holds a study with other settings (e.g. a quick one) is refused unless --restart."""
    if a.quick:
        a.output_dir = a.output_dir or tempfile.mkdtemp(prefix="tiny_pipeline_quick_")
        a.results_dir = a.results_dir or str(Path(a.output_dir) / "results")
        for d in (a.output_dir, a.results_dir):
            if Path(d).resolve().is_relative_to(HERE):
                raise StudyError(f"--quick never writes into {HERE} (the committed study); got {d}")
    a.output_dir = str(Path(a.output_dir or HERE / "work").resolve())
    a.results_dir = str(Path(a.results_dir or HERE).resolve())
    marker, want = Path(a.output_dir) / "study.json", study_settings(a)
    if marker.exists() and json.loads(marker.read_text()) != want:
        old = json.loads(marker.read_text())
        differ = sorted(k for k in want if old.get(k) != want[k])
        if not a.restart:
            raise StudyError(
                f"{a.output_dir} holds a study with other settings ({', '.join(differ)}); "
                "pass another --output_dir, or --restart to discard it"
            )
        shutil.rmtree(a.output_dir)
    Path(a.output_dir).mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(want, indent=1))


def fingerprint(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_done(out: Path, want: dict) -> bool:
    marker = out / "stage.json"
    return marker.exists() and json.loads(marker.read_text()) == want


def run_stage(out: Path, script: str, argv: list, upstream: tuple = ()) -> Path:
    """Run one of the project's scripts in this process, with these command-line flags. It is skipped
    when out/stage.json records the same flags and the same upstream stages; otherwise it is (re)run."""
    argv = [str(x) for x in argv]
    want = {
        "script": script,
        "argv": argv,
        "upstream": [json.loads((Path(u) / "stage.json").read_text()) for u in upstream],
    }
    if stage_done(out, want):
        return out
    import tyro

    module = importlib.import_module(script)
    flags = ["--output_dir", str(out), *argv] + (
        ["--overwrite_output_dir"] if (out / "args.json").exists() else []
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "stage.json").unlink(missing_ok=True)
    with open(out / "stage.log", "w") as log, redirect_stdout(log), redirect_stderr(log):
        print(f"python {script}.py " + " ".join(flags), flush=True)
        try:
            module.main(tyro.cli(module.Args, args=flags))
        except SystemExit as e:
            raise RuntimeError(
                f"{script}.py exited with {e.code}; see {out / 'stage.log'}"
            ) from None
        except module.DataError as e:
            raise RuntimeError(f"{script}.py: {e}; see {out / 'stage.log'}") from None
    (out / "stage.json").write_text(json.dumps(want, indent=1))
    return out


def write_jsonl(path: Path, rows: list):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(path)


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in open(path)]


def write_json(path: Path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.rename(path)


# ---- models: tokenizer, sampling, log-probs, reward-model scores ----


def make_base_model(d: Path, a: Args, seed: int, num_layers: int, name: str = "base") -> Path:
    """A word-level tokenizer over the task's vocabulary and a tiny untrained Llama, in d/name."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "sort", "="] + [str(i) for i in range(10)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=a.hidden_size,
        intermediate_size=3 * a.hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(d / name)
    tokenizer.save_pretrained(d / name)
    return d / name


def load_policy(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def generate(
    model, tok, prompts: list, max_new_tokens: int, sample: bool, batch: int = 256, temperature=1.0
) -> list:
    """-> per prompt (response ids, cut after the first EOS and including it; finished?)."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            ids = [tok(p).input_ids for p in prompts[i : i + batch]]
            width = max(map(len, ids))
            inp = torch.tensor([[0] * (width - len(s)) + s for s in ids])
            gen = model.generate(
                input_ids=inp,
                attention_mask=(inp != 0).long(),
                max_new_tokens=max_new_tokens,
                do_sample=sample,
                temperature=temperature if sample else None,
                top_k=0 if sample else None,
                top_p=None,
                pad_token_id=0,
                eos_token_id=1,
            )
            for row in gen[:, width:].tolist():
                cut = row.index(1) + 1 if 1 in row else len(row)
                out.append(([t for t in row[:cut] if t != 0], 1 in row))
    return out


def response_logps(model, prompts_ids: list, responses: list):
    """Summed log-probability of each response given its prompt (right-padded batch)."""
    import torch

    seqs = [p + r for p, r in zip(prompts_ids, responses)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        logits = model(
            input_ids=ids,
            attention_mask=(
                torch.arange(width)[None] < torch.tensor([len(s) for s in seqs])[:, None]
            ).long(),
        ).logits.float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    mask = torch.zeros_like(logps)
    for j, (p, r) in enumerate(zip(prompts_ids, responses)):
        mask[j, len(p) - 1 : len(p) - 1 + len(r)] = 1
    return (logps * mask).sum(-1)


def rm_scores(rm_path, prompts: list, completions: list, batch: int = 512) -> list:
    """Reward-model scores of finished completions (prompt ids + completion ids + EOS, as trained)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = AutoModelForSequenceClassification.from_pretrained(rm_path, num_labels=1).eval()
    tok = AutoTokenizer.from_pretrained(rm_path)
    scores = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            seqs = [
                tok(p).input_ids + tok(c).input_ids + [tok.eos_token_id]
                for p, c in zip(prompts[i : i + batch], completions[i : i + batch])
            ]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
            mask = (
                torch.arange(width)[None] < torch.tensor([len(s) for s in seqs])[:, None]
            ).long()
            hidden = rm(
                input_ids=ids, attention_mask=mask, output_hidden_states=True
            ).hidden_states[-1]
            last = torch.tensor([len(s) - 1 for s in seqs])
            scores += rm.score(hidden[torch.arange(len(seqs)), last]).squeeze(-1).tolist()
    return scores


def text(tok, ids: list) -> str:
    return tok.decode([t for t in ids if t != tok.eos_token_id], skip_special_tokens=True)


def evaluate(policy_path, sft_path, prompts: list, a: Args, seed: int, score, penalty: float,
             samples: int, val_prompts: list | None = None) -> dict:  # fmt: skip
    """On `prompts`: greedy gold; `samples` responses per prompt at temperature 1: gold, exact-answer
    rate, gold of finished answers, unfinished share, |length error|, Monte-Carlo KL(policy || SFT)
    and the labeller's score (`score` on finished responses, `penalty` on unfinished ones: what tuning
    sees; gold is only the reported outcome). With `val_prompts`: the temperature of --temperatures
    with the best labeller score on them, and the gold of `samples` test responses at it."""
    import torch

    torch.manual_seed(seed)
    policy, tok = load_policy(policy_path)
    sft, _ = load_policy(sft_path)
    greedy = generate(policy, tok, prompts, a.max_new_tokens, sample=False)
    many = [p for p in prompts for _ in range(samples)]
    sampled = generate(policy, tok, many, a.max_new_tokens, sample=True)
    pids = [tok(p).input_ids for p in many]
    responses = [r for r, _ in sampled]
    kl = []
    for i in range(0, len(many), 256):
        kl += (
            response_logps(policy, pids[i : i + 256], responses[i : i + 256])
            - response_logps(sft, pids[i : i + 256], responses[i : i + 256])
        ).tolist()
    texts = [text(tok, r) for r in responses]
    gold_s = [task.gold_reward(p, t) for p, t in zip(many, texts)]
    finished = [f for _, f in sampled]
    out = {
        "gold_greedy": statistics.fmean(
            task.gold_reward(p, text(tok, r)) for p, (r, _) in zip(prompts, greedy)
        ),
        "gold_sampled": statistics.fmean(gold_s),
        "exact": statistics.fmean(g == 1.0 for g in gold_s),
        "gold_finished": statistics.fmean([g for g, f in zip(gold_s, finished) if f] or [math.nan]),
        "kl_to_sft": statistics.fmean(kl),
        "unfinished": statistics.fmean(0.0 if f else 1.0 for f in finished),
        "length_error": statistics.fmean(
            abs(len(t.split()) - len(task.target(p))) for p, t in zip(many, texts)
        ),
        "labeller_score": labelled_mean(score, many, texts, finished, penalty),
    }
    if val_prompts is not None:
        t, by_t = tune_temperature(policy, tok, val_prompts, a, score, penalty)
        out["temperature"], out["val_score_by_temperature"] = t, by_t
        got = generate(policy, tok, many, a.max_new_tokens, sample=True, temperature=t)
        out["gold_tuned_t"] = statistics.fmean(
            task.gold_reward(p, text(tok, r)) for p, (r, _) in zip(many, got)
        )
    return out


def labelled_mean(score, prompts, texts, finished, penalty) -> float:
    return statistics.fmean(s if f else penalty for s, f in zip(score(prompts, texts), finished))


def tune_temperature(policy, tok, val_prompts, a: Args, score, penalty) -> tuple:
    """The temperature of --temperatures with the best labeller score on the validation prompts."""
    many = [p for p in val_prompts for _ in range(a.val_samples)]
    by_t = {}
    for t in a.temperatures:
        got = generate(policy, tok, many, a.max_new_tokens, sample=True, temperature=t)
        by_t[str(t)] = labelled_mean(score, many, [text(tok, r) for r, _ in got], [f for _, f in got], penalty)  # fmt: skip
    return float(max(by_t, key=by_t.get)), by_t


# ---- per seed: data, SFT, labeller calibration, preference data ----


def seed_dir(a: Args, seed: int) -> Path:
    return Path(a.output_dir) / f"seed_{seed}"


def bt_wins(gx: float, gy: float, u: float, temperature: float) -> bool:
    """Bradley-Terry label from a fixed uniform u: x wins iff u < sigmoid((gx - gy) / T). The same u
    for every temperature, so noisier labels flip a superset of the pairs a cleaner labeller flips."""
    if temperature <= 0:
        return gx > gy
    return u < 1 / (1 + math.exp(-max(min((gx - gy) / temperature, 50), -50)))


def prepare_seed(a: Args, seed: int) -> dict:
    """Data, base model and SFT policy of one seed; SFT samples for the labellers' calibration; the
    preference data: D (pairs of SFT samples on the RL prompts), corruption pairs on the same prompts,
    and the large reward model's pairs (half corruptions of the answer, half pairs of SFT samples)."""
    d = seed_dir(a, seed)
    info_path = d / "seed.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    start = time.process_time()
    rng = random.Random(seed)
    new_prompt = lambda: task.make_prompt(rng, a.min_digits, a.max_digits)
    write_jsonl(
        d / "sft.jsonl",
        [
            {"prompt": q, "completion": task.answer(q)}
            for q in (new_prompt() for _ in range(a.num_sft))
        ],
    )
    rl = [new_prompt() for _ in range(a.rl_prompts)]
    write_jsonl(d / "rl_prompts.jsonl", [{"prompt": q} for q in rl])
    n_pairs = max(a.budgets) // 2
    corrupt = []  # off-policy pairs of different gold on the same prompts
    while len(corrupt) < n_pairs:
        q = rl[len(corrupt) % len(rl)]
        x, y = (" " + " ".join(task.corrupt(task.target(q), rng)) for _ in range(2))
        if task.gold_reward(q, x) != task.gold_reward(q, y):
            corrupt.append({"prompt": q, "a": x, "b": y, "u": rng.random()})
    write_jsonl(d / "pairs_corrupt.jsonl", corrupt)
    val, test = [new_prompt() for _ in range(a.num_val)], [new_prompt() for _ in range(a.num_test)]
    write_jsonl(d / "val_prompts.jsonl", [{"prompt": q} for q in val])
    write_jsonl(d / "test_prompts.jsonl", [{"prompt": q} for q in test])
    # the SFT policy, and the reward models' own starting point: an SFT model of rm_num_layers layers
    for name, base, layers in (
        ("sft", "base", a.num_layers),
        ("sft_rm", "base_rm", a.rm_num_layers),
    ):
        run_stage(d / name, "sft", [
            "--model_name_or_path", make_base_model(d, a, seed, layers, base), "--init_from_scratch",
            "--dataset_name", d / "sft.jsonl", "--max_steps", a.sft_steps,
            "--per_device_train_batch_size", 32, "--learning_rate", a.sft_learning_rate,
            "--warmup_ratio", 0.05, "--seed", seed, "--save_steps", 0, "--logging_steps", 10,
            "--num_samples", 0,
        ])  # fmt: skip
    import torch

    torch.manual_seed(seed)
    model, tok = load_policy(d / "sft")
    k = 4
    samples = generate(
        model, tok, [q for q in val for _ in range(k)], a.max_new_tokens, sample=True
    )
    calib = []  # SFT-sample pairs on validation prompts: every labeller's accuracy is measured here
    for i, q in enumerate(val):
        group = [(text(tok, r), f) for r, f in samples[i * k : (i + 1) * k]]
        for (x, fx), (y, fy) in zip(group[::2], group[1::2]):
            if fx and fy and task.gold_reward(q, x) != task.gold_reward(q, y):
                calib.append({"prompt": q, "a": x, "b": y})
    write_jsonl(d / "calibration_pairs.jsonl", calib)
    gaps = [abs(task.gold_reward(c["prompt"], c["a"]) - task.gold_reward(c["prompt"], c["b"])) for c in calib]  # fmt: skip
    noisy_t = task.calibrate_temperature(gaps, a.noisy_accuracy)
    # D: pairs of distinct finished SFT samples on the RL prompts (prefixes give the smaller budgets)
    pairs, tries = [], 0
    while len(pairs) < n_pairs and tries < 20:
        tries += 1
        got = generate(model, tok, [q for q in rl for _ in range(k)], a.max_new_tokens, sample=True)
        for i, q in enumerate(rl):
            group = [(text(tok, r), f) for r, f in got[i * k : (i + 1) * k]]
            for (x, fx), (y, fy) in zip(group[::2], group[1::2]):
                if fx and fy and x != y and len(pairs) < n_pairs:
                    pairs.append({"prompt": q, "a": x, "b": y, "u": rng.random()})
    pairs = [pairs[i % len(pairs)] for i in range(n_pairs)]  # repeats only if SFT rarely finishes
    rng.shuffle(pairs)
    write_jsonl(d / "pairs_sft.jsonl", pairs)
    # the large reward model's "human" data: train pairs first, held-out pairs after them
    n = a.rm_large_pairs + a.rm_heldout
    rm_prompts = [new_prompt() for _ in range(n)]
    sft_samples = generate(model, tok, [q for q in rm_prompts[::2] for _ in range(2)], a.max_new_tokens, sample=True)  # fmt: skip
    rows = []
    for i, q in enumerate(rm_prompts):
        x, y = ((text(tok, sft_samples[i + j][0]) or " " for j in range(2)) if i % 2 == 0 else (" ", " "))  # fmt: skip
        while x == y:  # identical SFT samples, or the off-policy half: corruptions of the answer
            x, y = (" " + " ".join(task.corrupt(task.target(q), rng)) for _ in range(2))
        x_wins = bt_wins(task.gold_reward(q, x), task.gold_reward(q, y), rng.random(), a.bt_temperature)  # fmt: skip
        win, lose = (x, y) if x_wins else (y, x)
        rows.append({"prompt": q, "chosen": win, "rejected": lose})
    write_jsonl(d / "rm_pairs.jsonl", rows)
    info = {"seed": seed, "noisy_temperature": noisy_t, "calibration_pairs": len(calib),
            "sft_pair_rounds": tries, "cpu_s": time.process_time() - start}  # fmt: skip
    write_json(info_path, info)
    return info


def pair_file(a: Args, seed: int, source: str, temperature: float, n: int) -> Path:
    """The first n pairs of `source` (sft or corrupt) labelled chosen/rejected by Bradley-Terry at this
    temperature (0: by gold)."""
    d = seed_dir(a, seed)
    path = d / "labelled" / f"{source}_{temperature:.6g}_{n}.jsonl"
    if not path.exists():
        rows = []
        for r in read_jsonl(d / f"pairs_{source}.jsonl")[:n]:
            gx, gy = task.gold_reward(r["prompt"], r["a"]), task.gold_reward(r["prompt"], r["b"])
            x_wins = bt_wins(gx, gy, r["u"], temperature)
            rows.append({"prompt": r["prompt"], "chosen": r["a"] if x_wins else r["b"],
                         "rejected": r["b"] if x_wins else r["a"]})  # fmt: skip
        write_jsonl(path, rows)
    return path


def rm_name(arm: str, budget: int) -> str:
    return "rm_large" if arm == "rm_large" else f"{arm}_{budget}"


def train_reward_model(a: Args, seed: int, arm: str, budget: int) -> dict:
    """reward_model.py for an arm (rm_large: the large "human" set; rm_d / rm_d_noisy: D at this
    budget, with the arm's labels), then its checks: held-out accuracy on the large set's held-out
    pairs, accuracy on SFT-sample pairs (its labeller accuracy), probes, missing-EOS penalty."""
    d = seed_dir(a, seed)
    out = d / rm_name(arm, budget)
    result_path = out / "checks.json"
    if arm == "rm_large":
        data, split = d / "rm_pairs.jsonl", f"train[:{a.rm_large_pairs}]"
    else:
        t = a.bt_temperature if arm == "rm_d" else json.loads((d / "seed.json").read_text())["noisy_temperature"]  # fmt: skip
        data, split = pair_file(a, seed, "sft", t, budget // 2), "train"
    argv = [
        "--model_name_or_path", d / "sft_rm", "--dataset_name", data, "--train_split", split,
        "--num_train_epochs", a.rm_epochs, "--per_device_train_batch_size", 64,
        "--learning_rate", a.rm_learning_rate, "--warmup_ratio", 0.05, "--seed", seed,
        "--save_steps", 0, "--logging_steps", 20, "--eval_steps", 10**6,
    ]  # fmt: skip
    want = {"script": "reward_model", "argv": [str(x) for x in argv],
            "upstream": [json.loads((d / "sft_rm" / "stage.json").read_text())]}  # fmt: skip
    if stage_done(out, want) and result_path.exists():
        return json.loads(result_path.read_text())
    start = time.process_time()
    run_stage(out, "reward_model", argv, upstream=(d / "sft_rm",))
    held = read_jsonl(d / "rm_pairs.jsonl")[a.rm_large_pairs :]
    sc = rm_scores(out, [r["prompt"] for r in held] * 2, [r["chosen"] for r in held] + [r["rejected"] for r in held])  # fmt: skip
    calib = read_jsonl(d / "calibration_pairs.jsonl")
    sa = rm_scores(out, [c["prompt"] for c in calib] * 2, [c["a"] for c in calib] + [c["b"] for c in calib])  # fmt: skip
    gold = lambda c, k: task.gold_reward(c["prompt"], c[k])
    right = [(sa[i] > sa[i + len(calib)]) == (gold(c, "a") > gold(c, "b")) for i, c in enumerate(calib)]  # fmt: skip
    rng = random.Random(seed + 7)
    val = [r["prompt"] for r in read_jsonl(d / "val_prompts.jsonl")]
    longer = [task.answer(q) + "".join(f" {rng.randrange(10)}" for _ in range(rng.randint(1, 3))) for q in val]  # fmt: skip
    probe = rm_scores(out, val * 2, [task.answer(q) for q in val] + longer)
    penalty = statistics.fmean(sa) - 2 * statistics.pstdev(sa)
    result = {
        "heldout_accuracy": statistics.fmean(
            c > r for c, r in zip(sc[: len(held)], sc[len(held) :])
        ),
        "labeller_accuracy": statistics.fmean(right),
        "overlong_below_correct": statistics.fmean(
            c > x for c, x in zip(probe[: len(val)], probe[len(val) :])
        ),
        "unfinished_below_correct": statistics.fmean(c > penalty for c in probe[: len(val)]),
        "missing_eos_penalty": penalty,
        "cpu_s": time.process_time() - start,
    }
    write_json(result_path, result)
    return result


# ---- the labellers and the preference methods ----


def labeller(a: Args, seed: int, arm: str, budget: int) -> tuple:
    """-> (flags that make dpo.py/ppo.py use this labeller, its missing-EOS penalty, a Python scorer)."""
    if arm == "gold":
        return (["--reward_fn", f"{HERE / 'task.py'}:gold_reward_fn"], a.missing_eos_penalty, task.gold_reward_fn)  # fmt: skip
    rm = seed_dir(a, seed) / rm_name(arm, budget)
    checks = json.loads((rm / "checks.json").read_text())
    return (["--reward_model_name_or_path", rm], checks["missing_eos_penalty"],
            lambda prompts, completions: rm_scores(rm, prompts, completions))  # fmt: skip


def cell_budget(arm: str, method: str, budget: int):
    """DPO on the large reward model's own pairs does not depend on the budget: one cell, 'all'."""
    return "all" if (arm, method) == ("rm_large", "dpo") else budget


def train(a: Args, seed: int, arm: str, budget: int, method: str, lr: float, coef: float, out: Path,
          variant: str = "main") -> Path:  # fmt: skip
    """Train one method from the seed's SFT policy under one arm at one budget; -> the final policy."""
    d = seed_dir(a, seed)
    sft = d / "sft"
    flags, penalty, _ = labeller(a, seed, arm, budget)
    upstream = (sft,) + ((d / rm_name(arm, budget),) if arm != "gold" else ())
    common = ["--seed", seed, "--save_steps", 0, "--logging_steps", 10, "--lr_scheduler", "constant",
              "--warmup_ratio", 0, "--learning_rate", lr]  # fmt: skip
    dpo_common = [
        *common,
        "--beta",
        coef,
        "--per_device_train_batch_size",
        32,
        "--eval_steps",
        10**6,
    ]
    if method in ("dpo", "dpo_corrupt"):
        epochs = a.dpo_epochs
        if arm == "rm_large":  # the paper's DPO: on the large reward model's own pairs
            data, split, epochs, upstream = d / "rm_pairs.jsonl", f"train[:{a.rm_large_pairs}]", 1.0, (sft,)  # fmt: skip
        else:
            t = {"gold": 0.0, "rm_d": a.bt_temperature}.get(arm) if arm != "rm_d_noisy" else (
                json.loads((d / "seed.json").read_text())["noisy_temperature"])  # fmt: skip
            source = "corrupt" if arm == "gold" or method == "dpo_corrupt" else "sft"
            data, split, upstream = pair_file(a, seed, source, t, budget // 2), "train", (sft,)
        return run_stage(out, "dpo", [*dpo_common, "--model_name_or_path", sft, "--dataset_name", data,
                                      "--train_split", split, "--num_train_epochs", epochs], upstream)  # fmt: skip
    per_round = max(1, budget // (a.iterations * a.samples_per_prompt))  # prompts per round
    online = [*flags, "--missing_eos_penalty", penalty, "--samples_per_prompt", a.samples_per_prompt,
              "--max_new_tokens", a.max_new_tokens, "--top_k", 0, "--dataset_name", d / "rl_prompts.jsonl",
              "--num_train_epochs", a.dpo_epochs]  # fmt: skip
    if (
        method == "dpo_iter"
    ):  # the paper's chain: each round's reference is the previous round's policy
        return run_stage(out, "dpo", [*dpo_common, *online, "--model_name_or_path", sft,
                                      "--train_split", f"train[:{per_round}]", "--iterations", a.iterations], upstream)  # fmt: skip
    if (
        method == "dpo_iter_sft"
    ):  # the ablation: every round anchored to SFT (one dpo.py call per round)
        policy = sft
        for r in range(1, a.iterations + 1):
            policy = run_stage(out / f"round_{r}", "dpo", [
                *dpo_common[2:], "--seed", seed * 100 + r, *online, "--model_name_or_path", policy,
                "--ref_model_name_or_path", sft, "--train_split", f"train[:{per_round}]",
            ], upstream + ((policy,) if r > 1 else ()))  # fmt: skip
        return policy
    batch = a.ppo_batch // 4 if variant in ("baseline", "adv_norm") else a.ppo_batch
    extra = {"baseline": ["--no-whiten_advantages", "--ref_ema", 0], "adv_norm": ["--ref_ema", 0],
             "main": ["--ref_ema", 0], "large_batch": ["--ref_ema", 0],
             "ref_ema": ["--ref_ema", 1 / max(1, budget // batch)]}[variant]  # fmt: skip
    return run_stage(out, "ppo", [
        *common, "--model_name_or_path", sft, "--dataset_name", d / "rl_prompts.jsonl", *flags,
        "--missing_eos_penalty", penalty, "--max_new_tokens", a.max_new_tokens, "--top_k", 0,
        "--total_episodes", budget, "--per_device_prompt_batch_size", batch, "--num_minibatches", 4,
        "--per_device_train_batch_size", max(1, batch // 4), "--critic_learning_rate", 3 * lr,
        "--kl_coef", coef, "--eval_steps", 10**6, *extra,
    ], upstream)  # fmt: skip


def setting_name(lr: float, coef: float) -> str:
    return f"{lr:g},{coef:g}"


def cell(a: Args, kind: str, seed: int, arm: str, budget, method: str, setting: str) -> dict:
    """One (kind, arm, budget, method, setting, seed) cell: train (unless SFT), evaluate, save.
    kind: 'tune' (validation prompts), 'main' or 'ablation' (test prompts)."""
    path = cell_path(a, kind, seed, arm, budget, method, setting)
    if path.exists():
        return json.loads(path.read_text())
    start = time.process_time()
    d = seed_dir(a, seed)
    lb = (
        max(a.budgets) if budget == "all" else budget
    )  # the labeller of the 'all' cells: any budget
    if method == "sft":
        policy = d / "sft"
    else:
        variant = "main"
        if kind != "ablation":
            lr, coef = (float(x) for x in setting.split(","))
        else:
            variant = setting
            lr, coef = (float(x) for x in chosen_settings(a)["gold"][str(budget)]["ppo"].split(","))
        out = d / "runs" / kind / arm / str(budget) / method / setting.replace(",", "_")
        policy = train(a, seed, arm, lb, method, lr, coef, out, variant)
    prompts = [r["prompt"] for r in read_jsonl(d / f"{'val' if kind == 'tune' else 'test'}_prompts.jsonl")]  # fmt: skip
    val = None if kind == "tune" else [r["prompt"] for r in read_jsonl(d / "val_prompts.jsonl")]
    _, penalty, score = labeller(a, seed, arm, lb)
    samples = a.val_samples if kind == "tune" else a.eval_samples
    result = {**evaluate(policy, d / "sft", prompts, a, seed, score, penalty, samples, val),
              "setting": setting, "cpu_s": time.process_time() - start}  # fmt: skip
    write_json(path, result)
    return result


def cell_path(a: Args, kind: str, seed: int, arm: str, budget, method: str, setting: str) -> Path:
    return (Path(a.output_dir) / "cells" / kind / arm / str(budget) / method
            / setting.replace(",", "_") / f"seed_{seed}.json")  # fmt: skip


def chosen_settings(a: Args) -> dict:
    return json.loads((Path(a.output_dir) / "tuning.json").read_text())["chosen"]


# ---- headroom and baselines ----


def best_of_n_oracle(golds: list, n: int) -> float:
    """Unbiased estimate of E[max of n draws] from k >= n samples (the order-statistics estimator)."""
    k, xs = len(golds), sorted(golds)
    return sum(math.comb(i, n - 1) * x for i, x in enumerate(xs)) / math.comb(k, n)


def sft_samples(a: Args, seed: int, split: str) -> list:
    """--headroom_samples SFT samples (temperature 1) per prompt of a split, cached: rows per prompt of
    (text, finished)."""
    d = seed_dir(a, seed)
    path = d / f"sft_samples_{split}.json"
    if path.exists():
        return json.loads(path.read_text())
    import torch

    torch.manual_seed(seed + 17)
    model, tok = load_policy(d / "sft")
    prompts = [r["prompt"] for r in read_jsonl(d / f"{split}_prompts.jsonl")]
    k = a.headroom_samples
    got = generate(
        model, tok, [p for p in prompts for _ in range(k)], a.max_new_tokens, sample=True
    )
    rows = [[(text(tok, r), f) for r, f in got[i * k : (i + 1) * k]] for i in range(len(prompts))]
    write_json(path, rows)
    return rows


def headroom(a: Args, seed: int, split: str = "test") -> dict:
    """Oracle ceilings from SFT samples: mean gold, oracle best-of-2/4 (unbiased), and the KL-regularised
    optimum pi_SFT exp(r / 0.1) (r = gold, -1 if unfinished; self-normalised per prompt) with its KL."""
    path = seed_dir(a, seed) / f"headroom_{split}.json"
    if path.exists():
        return json.loads(path.read_text())
    start = time.process_time()
    prompts = [r["prompt"] for r in read_jsonl(seed_dir(a, seed) / f"{split}_prompts.jsonl")]
    rows = sft_samples(a, seed, split)
    golds = [[task.gold_reward(p, t) for t, _ in row] for p, row in zip(prompts, rows)]
    opt, kl = [], []
    for g, row in zip(golds, rows):
        r = [x if f else a.missing_eos_penalty for x, (_, f) in zip(g, row)]
        w = [math.exp((x - max(r)) / 0.1) for x in r]
        w = [x / sum(w) for x in w]
        opt.append(sum(wi * gi for wi, gi in zip(w, g)))
        kl.append(sum(wi * math.log(wi * len(w)) for wi in w if wi > 0))
    out = {
        "sft": statistics.fmean(x for g in golds for x in g),
        "best_of_2": statistics.fmean(best_of_n_oracle(g, 2) for g in golds),
        "best_of_4": statistics.fmean(best_of_n_oracle(g, 4) for g in golds),
        "oracle": statistics.fmean(opt),
        "oracle_kl": statistics.fmean(kl),
        "cpu_s": time.process_time() - start,
    }
    write_json(path, out)
    return out


def baselines(a: Args, seed: int, arm: str, budget: int) -> dict:
    """The arm's free baselines on test prompts: best-of-N of SFT samples picked by the arm's labeller
    (disjoint groups of N of the cached samples), and SFT at the temperature its labeller prefers."""
    path = cell_path(a, "main", seed, arm, budget, "sft", "baselines")
    if path.exists():
        return json.loads(path.read_text())
    start = time.process_time()
    d = seed_dir(a, seed)
    prompts = [r["prompt"] for r in read_jsonl(d / "test_prompts.jsonl")]
    rows = sft_samples(a, seed, "test")
    _, penalty, score = labeller(a, seed, arm, budget)
    flat_p = [p for p, row in zip(prompts, rows) for _ in row]
    flat = [x for row in rows for x in row]
    s = [v if f else penalty for v, (_, f) in zip(score(flat_p, [t for t, _ in flat]), flat)]
    out, k = {}, len(rows[0])
    for n in (2, 4):
        picks = []
        for i, p in enumerate(prompts):
            for j in range(0, k - n + 1, n):
                group = range(i * k + j, i * k + j + n)
                picks.append(task.gold_reward(p, flat[max(group, key=lambda m: s[m])][0]))
        out[f"best_of_{n}"] = statistics.fmean(picks)
    import torch

    torch.manual_seed(seed)
    model, tok = load_policy(d / "sft")
    val = [r["prompt"] for r in read_jsonl(d / "val_prompts.jsonl")]
    t, by_t = tune_temperature(model, tok, val, a, score, penalty)
    many = [p for p in prompts for _ in range(a.eval_samples)]
    got = generate(model, tok, many, a.max_new_tokens, sample=True, temperature=t)
    out.update(sft_tuned_t=statistics.fmean(task.gold_reward(p, text(tok, r)) for p, (r, _) in zip(many, got)),
               temperature=t, val_score_by_temperature=by_t, cpu_s=time.process_time() - start)  # fmt: skip
    write_json(path, out)
    return out


# ---- tuning grids ----


def grid_axes(a: Args, method: str) -> tuple:
    return (a.ppo_lrs, a.ppo_coefs) if method == "ppo" else (a.dpo_lrs, a.dpo_coefs)


def extend(values: list, at_top: bool) -> list:
    """One more grid value past an edge, on the grid's own log spacing (x or / its last ratio)."""
    if len(values) < 2:
        return values
    ratio = values[-1] / values[-2] if at_top else values[0] / values[1]
    return values + [values[-1] * ratio] if at_top else [values[0] * ratio] + values


def extended_grid(lrs: list, coefs: list, chosen: str) -> tuple | None:
    """The grid extended past every edge the chosen setting sits on (None: it is inside)."""
    lr, coef = (float(x) for x in chosen.split(","))
    new_lrs, new_coefs = list(lrs), list(coefs)
    # `chosen` is a setting name (6 significant digits: 3.33333 for 1 / 0.3), hence rel_tol
    same = lambda x, y: math.isclose(x, y, rel_tol=1e-4)
    if len(lrs) > 1 and same(lr, max(lrs)):
        new_lrs = extend(sorted(lrs), True)
    elif len(lrs) > 1 and same(lr, min(lrs)):
        new_lrs = extend(sorted(lrs), False)
    if len(coefs) > 1 and same(coef, max(coefs)):
        new_coefs = extend(sorted(coefs), True)
    elif len(coefs) > 1 and same(coef, min(coefs)):
        new_coefs = extend(sorted(coefs), False)
    if (new_lrs, new_coefs) == (list(lrs), list(coefs)):
        return None
    return new_lrs, new_coefs


def tune_points(a: Args) -> list:
    """Every (arm, budget key, method) that is tuned."""
    out = []
    for arm, methods in ARMS.items():
        for method in methods:
            for b in dict.fromkeys(cell_budget(arm, method, b) for b in a.budgets):
                out.append((arm, b, method))
    return out


def run_tuning(a: Args, pool, points: list, on_done=None) -> dict:
    """Each point's grid on the tuning seeds; the arm's labeller picks by its mean validation score;
    a pick on an edge extends the grid (up to --max_extensions times). -> {point: record}."""
    grids = {p: grid_axes(a, p[2]) for p in points}
    records = {}
    for round_ in range(a.max_extensions + 1):
        jobs = [(cell, a, "tune", s, arm, b, m, setting_name(lr, c))
                for (arm, b, m), (lrs, cs) in grids.items() for lr in lrs for c in cs for s in a.tuning_seeds]  # fmt: skip
        rows = run_jobs(a, pool, jobs, on_done)
        by = {}
        for j, r in zip(jobs, rows):
            by.setdefault(j[4:7], {}).setdefault(j[7], []).append(r)
        nxt = {}
        for p, (lrs, cs) in grids.items():
            scores = {
                g: statistics.fmean(r["labeller_score"] for r in rs) for g, rs in by[p].items()
            }
            gold = {g: statistics.fmean(r["gold_sampled"] for r in rs) for g, rs in by[p].items()}
            chosen = max(scores, key=scores.get)
            records[p] = {"scores": scores, "gold_sampled": gold, "chosen": chosen, "lrs": lrs,
                          "coefs": cs, "extensions": round_, "on_edge": False}  # fmt: skip
            ext = extended_grid(lrs, cs, chosen)
            if ext is not None:
                if round_ < a.max_extensions:
                    nxt[p] = ext
                else:
                    records[p]["on_edge"] = True
        if not nxt:
            break
        grids = nxt
    return records


# ---- the cost plan ----

# unit CPU-s (one thread), measured on this task's default sizes (2026-11 runs and review)
UNIT = {"ppo_episode": 0.004, "ppo_episode_rm": 0.0054, "dpo_pair_visit": 0.0019,
        "dpo_iter_sample": 0.0014, "rm_pair_epoch": 0.0021, "seed_data_sft": 35.0,
        "eval_sample": 0.0009, "stage": 1.5}  # fmt: skip


def cost_plan(a: Args) -> dict:
    """CPU-s of the whole design from UNIT: tuning (one grid per point, no extension), reported cells,
    reward models, data and SFT, baselines; per part."""

    def train_cost(arm, method, b):
        if method == "ppo":
            return b * UNIT["ppo_episode" if arm == "gold" else "ppo_episode_rm"] + UNIT["stage"]
        if method in ("dpo", "dpo_corrupt"):
            n = a.rm_large_pairs * 1.0 if b == "all" else b / 2 * a.dpo_epochs
            return n * UNIT["dpo_pair_visit"] + UNIT["stage"]
        b = b if b != "all" else max(a.budgets)
        stages = a.iterations if method == "dpo_iter_sft" else 1
        return b * UNIT["dpo_iter_sample"] + b / 8 * a.dpo_epochs * UNIT["dpo_pair_visit"] + stages * UNIT["stage"]  # fmt: skip

    grid = len(a.ppo_lrs) * len(a.ppo_coefs)
    tune_eval = a.num_val * (a.val_samples + 1) * UNIT["eval_sample"]
    main_eval = (a.num_test * (2 * a.eval_samples + 1) + a.num_val * a.val_samples * len(a.temperatures)) * UNIT["eval_sample"]  # fmt: skip
    plan = {"tuning": 0.0, "reported_cells": 0.0}
    for arm, b, m in tune_points(a):
        c = train_cost(arm, m, b)
        plan["tuning"] += grid * len(a.tuning_seeds) * (c + tune_eval)
        plan["reported_cells"] += len(a.seeds) * (c + main_eval)
    n_seeds = len(set(a.seeds) | set(a.tuning_seeds))
    rms = a.rm_large_pairs * a.rm_epochs * UNIT["rm_pair_epoch"] + sum(
        2 * (b / 2) * a.rm_epochs * UNIT["rm_pair_epoch"] for b in a.budgets)  # fmt: skip
    plan["reward_models"] = n_seeds * rms
    plan["data_and_sft"] = n_seeds * UNIT["seed_data_sft"]
    plan["baselines_and_headroom"] = len(a.seeds) * len(ARMS) * len(a.budgets) * main_eval + n_seeds * a.num_test * a.headroom_samples * UNIT["eval_sample"]  # fmt: skip
    plan["ablation"] = len(a.seeds) * 3 * (train_cost("gold", "ppo", min(a.budgets)) + main_eval)
    plan["total"] = sum(plan.values())
    return {k: round(v) for k, v in plan.items()}


T95 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
]


def mean_ci(values: list) -> tuple:
    """Mean and half-width of the 95% t-interval (nan half-width for fewer than 2 values)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, float("nan")
    return m, T95[min(len(values) - 2, len(T95) - 1)] * statistics.stdev(values) / math.sqrt(
        len(values)
    )


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) (continued fraction, Numerical Recipes' betacf)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - betainc(b, a, 1.0 - x)
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / (c if abs(c) > tiny else tiny)
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f / a


def t_cdf(t: float, df: int) -> float:
    """Student's t CDF: P(|T| > |t|) = I_{df / (df + t^2)}(df / 2, 1 / 2)."""
    tail = betainc(df / 2, 0.5, df / (df + t * t)) / 2
    return 1 - tail if t > 0 else tail


def t_quantile(p: float, df: int) -> float:
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def paired_test(diffs: list, alpha: float = 0.05) -> dict:
    """Mean, (1 - alpha) t-interval half-width and two-sided p-value of paired differences."""
    n = len(diffs)
    m = statistics.fmean(diffs)
    if n < 2:
        return {"n": n, "mean": m, "half_width": math.nan, "p": math.nan}
    se = statistics.stdev(diffs) / math.sqrt(n)
    if se == 0:
        return {"n": n, "mean": m, "half_width": 0.0, "p": 0.0 if m else 1.0}
    return {"n": n, "mean": m, "half_width": t_quantile(1 - alpha / 2, n - 1) * se,
            "p": 2 * (1 - t_cdf(abs(m) / se, n - 1))}  # fmt: skip


def holm(pvalues: dict) -> dict:
    """Holm's step-down adjusted p-values (nan stays nan and is left out of the family)."""
    ok = sorted((p, k) for k, p in pvalues.items() if not math.isnan(p))
    out, running = {k: math.nan for k in pvalues}, 0.0
    for i, (p, k) in enumerate(ok):
        running = max(running, min(1.0, (len(ok) - i) * p))
        out[k] = running
    return out


def collect(a: Args) -> tuple:
    """results.json (its fixed shape; None where a cell has not finished) and details."""
    d = lambda s: seed_dir(a, s)
    load = lambda p: json.loads(p.read_text()) if p.exists() else None
    chosen = (load(Path(a.output_dir) / "tuning.json") or {}).get("chosen")
    results = {"seeds": list(a.seeds), "budgets": list(a.budgets), "arms": {}, "ablation": {},
               "headroom": {k: [] for k in HEADROOM + ["oracle_kl"]}}  # fmt: skip
    details = {
        "length_error": {},
        "gold_finished": {},
        "cpu_s": {},
        "reward_models": {},
        "cells_done": 0,
    }
    for s in a.seeds:
        h = load(d(s) / "headroom_test.json")
        for k in results["headroom"]:
            results["headroom"][k].append(h[k] if h else None)
    for arm, methods in ARMS.items():
        body = {"budgets": {}}
        for b in a.budgets:
            acc = []
            for s in a.seeds:
                if arm == "gold":
                    acc.append(1.0)
                elif c := load(d(s) / rm_name(arm, b) / "checks.json"):
                    acc.append(c["labeller_accuracy"])
                    details["reward_models"].setdefault(f"{arm} {b}", []).append(c)
            per = {}
            for m in ["sft"] + methods:
                rows = [load(cell_path(a, "main", s, "gold" if m == "sft" else arm,
                                       "all" if m == "sft" else cell_budget(arm, m, b), m, "final"))
                        for s in a.seeds]  # fmt: skip
                if m != "sft":  # a cell of a setting tuning no longer chooses is not reported
                    want = chosen[arm][str(cell_budget(arm, m, b))][m] if chosen else None
                    rows = [
                        r if r and (want is None or r["setting"] == want) else None for r in rows
                    ]
                    details["cells_done"] += sum(r is not None for r in rows)
                per[m] = {k: [r.get(k) if r else None for r in rows] for k in METRICS}
                for key in ("length_error", "gold_finished", "cpu_s"):
                    details[key].setdefault(arm, {}).setdefault(str(b), {})[m] = [r.get(key) if r else None for r in rows]  # fmt: skip
            base = [load(cell_path(a, "main", s, arm, b, "sft", "baselines")) for s in a.seeds]
            body["budgets"][str(b)] = {
                "labeller_accuracy": statistics.fmean(acc) if acc else None,
                "methods": per,
                "baselines": {
                    k: [r[k] if r else None for r in base] for k in BASELINES + ["temperature"]
                },
            }
        top = body["budgets"][str(max(a.budgets))]
        results["arms"][arm] = {"labeller_accuracy": top["labeller_accuracy"], "methods": top["methods"],
                                "budgets": body["budgets"]}  # fmt: skip
    b0 = min(a.budgets)
    for v in ABLATION:
        p = lambda s, v=v: cell_path(a, "main", s, "gold", b0, "ppo", "final") if v == "large_batch" else (
            cell_path(a, "ablation", s, "gold", b0, "ppo", v))  # fmt: skip
        rows = [load(p(s)) for s in a.seeds]
        results["ablation"][v] = {"gold_sampled": [r["gold_sampled"] if r else None for r in rows]}
    results["preregistered"] = preregistration(a)
    tests = contrasts(a, results)
    results["holm"] = {k: v["p_holm"] for k, v in tests.items() if v["primary"]}
    details["contrasts"] = tests
    return results, details


def verdict(diffs: list, x: str, y: str) -> str:
    """From a 95% t-interval of paired differences x - y."""
    if len(diffs) < 2:
        return "not enough seeds yet"
    m, h = mean_ci(diffs)
    if m - h > 0:
        return f"{NAMES[x]} better"
    if m + h < 0:
        return f"{NAMES[y]} better"
    return "not resolved"


def contrast_name(arm: str, x: str, y: str, b) -> str:
    return f"{arm}: {x} - {y} @ {b}"


def paired(results: dict, arm: str, x: str, y: str, b, metric: str = "gold_sampled") -> list:
    m = results["arms"][arm]["budgets"][str(b)]["methods"]
    return [p - q for p, q in zip(m[x][metric], m[y][metric]) if p is not None and q is not None]


def contrasts(a: Args, results: dict) -> dict:
    """Every primary and secondary contrast at every budget: paired t (95%), p, the Holm-adjusted p and a
    simultaneous (Bonferroni) interval across the primary family, and the effect as a share of the
    headroom (oracle best-of-4 - SFT, mean over the same seeds)."""
    h = results["headroom"]
    room = [b4 - s for b4, s in zip(h["best_of_4"], h["sft"]) if b4 is not None and s is not None]
    room = statistics.fmean(room) if room else math.nan
    family = len(PRIMARY) * len(a.budgets)
    out = {}
    for primary, group in ((True, PRIMARY), (False, SECONDARY)):
        for arm, x, y in group:
            for b in a.budgets:
                diffs = paired(results, arm, x, y, b)
                t = paired_test(diffs) if diffs else {"n": 0, "mean": math.nan, "half_width": math.nan, "p": math.nan}  # fmt: skip
                simul = (
                    paired_test(diffs, 0.05 / family)["half_width"]
                    if primary and diffs
                    else math.nan
                )
                greedy = paired(results, arm, x, y, b, "gold_greedy")
                out[contrast_name(arm, x, y, b)] = {
                    **t, "primary": primary, "simultaneous_half_width": simul,
                    "share_of_headroom": t["mean"] / room if room and not math.isnan(room) else math.nan,
                    "greedy_mean": statistics.fmean(greedy) if greedy else math.nan,
                }  # fmt: skip
    adj = holm({k: v["p"] for k, v in out.items() if v["primary"]})
    for k, v in out.items():
        v["p_holm"] = adj.get(k, math.nan)
    return out


def preregistration(a: Args) -> dict:
    """The pre-registered contrasts and the last commit that changed preregistered.json (None: not
    committed; quick runs record the in-code list only)."""
    contrasts_ = [contrast_name(arm, x, y, b) for arm, x, y in PRIMARY for b in a.budgets]
    if a.quick:
        return {"contrasts": contrasts_, "commit": None}
    commit = None
    if PREREGISTERED.exists():
        try:
            commit = subprocess.run(
                ["git", "log", "-1", "--format=%H", "--", str(PREREGISTERED)],
                cwd=REPO, capture_output=True, text=True, check=True,
            ).stdout.split()[-1:] or [None]  # fmt: skip
            commit = commit[0]
        except (OSError, subprocess.CalledProcessError):
            commit = None
        contrasts_ = json.loads(PREREGISTERED.read_text())["contrasts"]
    return {"contrasts": contrasts_, "commit": commit}


def fmt(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    m, h = mean_ci(values)
    return f"{m:.3f}" if math.isnan(h) else f"{m:.3f} ± {h:.3f}"


def write_report(a: Args, extra: dict, wall: float, final: bool):
    results, details = collect(a)
    details.update(extra)
    out = Path(a.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    write_json(out / "details.json", details)
    h = results["headroom"]
    lines = [
        (
            f"# Tiny pipeline: when does PPO beat DPO? ({'quick smoke run' if a.quick else 'full run'}"
            f"{'' if final else ', PARTIAL: still running'})"
        ),
        "",
        (
            f"Produced by `examples/tiny_pipeline/run.py` (design: its docstring). Reported seeds {a.seeds}, "
            f"budgets {a.budgets} scored responses; {details['cells_done']} trained cells finished; wall "
            f"time {wall / 60:.1f} min. Mean over seeds ± half-width of the 95% t-interval, on {a.num_test} "
            f"test prompts per seed, {a.eval_samples} samples each. Gold reward in [-3, 1]. 'T=1' = sampled "
            "at temperature 1 (primary); 'tuned T' = at the temperature its labeller picked on validation."
        ),
        "",
        "## Headroom (oracle, from SFT samples)",
        "",
        (
            f"SFT {fmt(h['sft'])}; oracle best-of-2 {fmt(h['best_of_2'])}; best-of-4 {fmt(h['best_of_4'])}; "
            f"KL-regularised optimum (beta 0.1) {fmt(h['oracle'])} at KL {fmt(h['oracle_kl'])}."
        ),
        "",
    ]
    for arm, body in results["arms"].items():
        for b, bb in body["budgets"].items():
            acc = bb["labeller_accuracy"]
            lines += [
                f"## Arm `{arm}`, budget {b}" + (f" (labeller accuracy on SFT-sample pairs {acc:.3f})" if acc else ""),
                "",
                "| method | gold, T=1 | gold, tuned T | greedy | exact | unfinished | KL to SFT |",
                "| --- | --- | --- | --- | --- | --- | --- |",
            ]  # fmt: skip
            for m, v in bb["methods"].items():
                lines.append(f"| {NAMES[m]} | {fmt(v['gold_sampled'])} | {fmt(v['gold_tuned_t'])} | "
                             f"{fmt(v['gold_greedy'])} | {fmt(v['exact'])} | {fmt(v['unfinished'])} | "
                             f"{fmt(v['kl_to_sft'])} |")  # fmt: skip
            bl = bb["baselines"]
            lines += [
                "",
                (
                    f"Baselines: SFT at tuned T {fmt(bl['sft_tuned_t'])}; best-of-2 by this labeller "
                    f"{fmt(bl['best_of_2'])}; best-of-4 {fmt(bl['best_of_4'])}."
                ),
                "",
            ]
    lines += [
        "## Contrasts (paired per seed, sampled gold at T=1)",
        "",
        "Primary (pre-registered" + (f" at {results['preregistered']['commit']}" if results["preregistered"]["commit"] else "")
        + "): Holm-adjusted p across the family, simultaneous (Bonferroni) interval.",
        "",
        "| contrast | n | mean ± 95% | simultaneous | p | p (Holm) | share of headroom | greedy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for k, v in details["contrasts"].items():
        num = lambda x, f=".3f": "-" if x is None or math.isnan(x) else format(x, f)
        lines.append(f"| {'**' + k + '**' if v['primary'] else k} | {v['n']} | {num(v['mean'])} ± "
                     f"{num(v['half_width'])} | {num(v['simultaneous_half_width'])} | {num(v['p'], '.4f')} | "
                     f"{num(v['p_holm'], '.4f')} | {num(v['share_of_headroom'], '.2f')} | {num(v['greedy_mean'])} |")  # fmt: skip
    if extra.get("tuning"):
        lines += ["", "## Tuning (tuning seeds, validation; the arm's labeller picks; [gold])", "",
                  "| arm | budget | method | chosen | labeller score [gold] | grid extensions | on an edge |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for key, r in extra["tuning"]["records"].items():
            c = r["chosen"]
            if c not in r["scores"]:  # a one-setting grid: not run
                lines.append(f"| {key.replace(' ', ' | ')} | {c} | - | 0 | False |")
                continue
            lines.append(f"| {key.replace(' ', ' | ')} | {c} | {r['scores'][c]:.3f} [{r['gold_sampled'][c]:.3f}] | "
                         f"{r['extensions']} | {r['on_edge']} |")  # fmt: skip
    lines += ["", "## Table 3 ablation (gold arm, smallest budget, cumulative)", "",
              "| variant | gold, T=1 | difference to the previous row |", "| --- | --- | --- |"]  # fmt: skip
    prev = None
    for v in ABLATION:
        vals = results["ablation"][v]["gold_sampled"]
        diff = (
            [p - q for p, q in zip(vals, prev) if p is not None and q is not None] if prev else []
        )
        lines.append(f"| {ABLATION_LABELS[v]} | {fmt(vals)} | {fmt(diff)} |")
        prev = vals
    lines += ["", "![gold against budget](gold_vs_budget.png)", ""]
    (out / "results.md").write_text("\n".join(lines))
    plot(results, out / "gold_vs_budget.png")


def plot(results: dict, path: Path):
    """Per arm: each method's sampled gold against the label budget, with SFT, the arm's best-of-4 and
    the oracle best-of-4 as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(results["arms"])
    fig, axes = plt.subplots(1, len(arms), figsize=(4 * len(arms), 3.6), sharey=True)
    for ax, arm in zip(axes, arms):
        bud = results["arms"][arm]["budgets"]
        xs = [int(b) for b in bud]
        for m in bud[str(xs[0])]["methods"]:
            pts = [(x, *mean_ci(v)) for x in xs if (v := [y for y in bud[str(x)]["methods"][m]["gold_sampled"] if y is not None])]  # fmt: skip
            if pts:
                px, py, ph = zip(*pts)
                ax.errorbar(px, py, yerr=[0 if math.isnan(e) else e for e in ph], fmt="o-", capsize=3, label=NAMES[m])  # fmt: skip
        oracle = [v for v in results["headroom"]["best_of_4"] if v is not None]
        if oracle:
            ax.axhline(
                statistics.fmean(oracle), color="grey", ls="--", lw=0.8, label="oracle best-of-4"
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("label budget (scored responses)")
        ax.set_title(arm)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("gold reward, sampled at T=1 (test)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def worker_init():
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()  # no load reports for the reward model's fresh score head


def call(fn, *args):
    """Run in a worker; report the failing task in one line instead of a pickled traceback."""
    try:
        return fn(*args)
    except (
        RuntimeError
    ) as e:  # a stage's one-line error; anything else is a bug: its traceback shows
        raise RuntimeError(f"{fn.__name__}{args[1:]}: {e}") from None


def run_all(pool, tasks: list, on_done=None, failed: list | None = None) -> list:
    """Run the tasks on the pool. With `failed`, a task whose stage fails is listed there (one line)
    and the others go on (the study's cells); without it, the first failure stops the study."""
    futures = {pool.submit(call, *t): i for i, t in enumerate(tasks)}
    results = [None] * len(tasks)
    pending = set(futures)
    while pending:
        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
        for f in finished:
            try:
                results[futures[f]] = f.result()
            except RuntimeError as e:
                if failed is None:
                    raise
                failed.append(str(e))
                print(f"cell failed: {e}", flush=True)
            if on_done:
                on_done()
    return results


GATE_ORDER = {  # the order the gate tries the grid in (most promising first, from the 2k study)
    "ppo": [(1e-3, 0.1), (3e-3, 0.03), (1e-3, 0.03), (3e-3, 0.1)],
    "dpo_iter": [(1e-4, 0.1), (3e-5, 0.3)],
}


def gate_report(a: Args, gate_cells: list) -> dict:
    """headroom.json: per tuning seed the validation headroom; per gate setting its mean validation gold
    and share of the SFT -> oracle best-of-4 headroom; passed when a setting with every tuning seed
    finished reaches --gate_share."""
    rooms = {s: json.loads(p.read_text()) for s in a.tuning_seeds
             if (p := seed_dir(a, s) / "headroom_val.json").exists()}  # fmt: skip
    settings = {}
    for method, setting in dict.fromkeys((m, g) for m, g in gate_cells):
        rows = {s: json.loads(p.read_text()) for s in a.tuning_seeds
                if (p := cell_path(a, "tune", s, "gold", max(a.budgets), method, setting)).exists()}  # fmt: skip
        seeds = [s for s in rows if s in rooms]
        if not seeds:
            continue
        gold = statistics.fmean(rows[s]["gold_sampled"] for s in seeds)
        sft = statistics.fmean(rooms[s]["sft"] for s in seeds)
        b4 = statistics.fmean(rooms[s]["best_of_4"] for s in seeds)
        settings[f"{method} {setting}"] = {
            "seeds": seeds, "gold_sampled": gold, "per_seed": [rows[s]["gold_sampled"] for s in seeds],
            "kl_to_sft": statistics.fmean(rows[s]["kl_to_sft"] for s in seeds),
            "unfinished": statistics.fmean(rows[s]["unfinished"] for s in seeds),
            "exact": statistics.fmean(rows[s]["exact"] for s in seeds),
            "share": (gold - sft) / (b4 - sft), "cpu_s": [rows[s]["cpu_s"] for s in seeds],
        }  # fmt: skip
    complete = {k: v for k, v in settings.items() if len(v["seeds"]) == len(a.tuning_seeds)}
    best = max(complete, key=lambda k: complete[k]["share"]) if complete else None
    out = {
        "rule": f"best trained method (gold arm, budget {max(a.budgets)}) reaches >= {a.gate_share} of the "
        "way from SFT to oracle best-of-4, sampled gold at T=1 on validation prompts, mean over the tuning seeds",
        "tuning_seeds": a.tuning_seeds, "budget": max(a.budgets),
        "headroom": {str(s): r for s, r in rooms.items()}, "settings": settings, "best": best,
        "passed": bool(best and complete[best]["share"] >= a.gate_share),
    }  # fmt: skip
    write_json(Path(a.results_dir) / "headroom.json", out)
    return out


PREPARED: dict = {}  # seed -> prepare_seed's report, for the seeds prepared in this run


def job_seed_and_result(job: tuple) -> tuple:
    """(seed, whether its result is on disk) of a cell, final_cell, baselines or headroom job."""
    fn, a, *args = job
    if fn is headroom:
        return args[0], (seed_dir(a, args[0]) / f"headroom_{args[1]}.json").exists()
    if fn is baselines:
        return args[0], cell_path(a, "main", *args, "sft", "baselines").exists()
    path = cell_path(a, *args[:5], "final" if fn is final_cell else args[5])
    done = path.exists() and (fn is cell or json.loads(path.read_text())["setting"] == args[5])
    return args[1], done


TRAINED: set = set()  # (seed, arm, budget) of the reward models trained (or found done) in this run


def job_labeller(job: tuple) -> tuple | None:
    """(seed, arm, budget) of the reward model a job scores with (None: gold, or no labeller)."""
    fn, a, *args = job
    if fn is baselines:
        seed, arm, budget = args
    elif fn in (cell, final_cell) and args[4] != "sft":
        seed, arm, budget = args[1], args[2], args[3]
    else:
        return None
    if arm == "gold":
        return None
    return seed, arm, max(a.budgets) if budget == "all" or arm == "rm_large" else budget


def run_jobs(a: Args, pool, jobs: list, on_done=None, failed: list | None = None) -> list:
    """run_all, after preparing the data and SFT of every seed with a job still to compute, and the
    reward models those jobs score with. A seed whose results are all on disk (computed, or restored
    by `restore`) is never prepared."""
    status = [(j, *job_seed_and_result(j)) for j in jobs]  # (job, seed, done)
    todo = [j for j, _, done in status if not done]
    seeds = [s for s in dict.fromkeys(s for _, s, done in status if not done) if s not in PREPARED]
    if seeds:
        PREPARED.update(zip(seeds, run_all(pool, [(prepare_seed, a, s) for s in seeds])))
    rms = [r for r in dict.fromkeys(map(job_labeller, todo)) if r and r not in TRAINED]
    for r in rms:  # a restored reward model whose weights were lost: retraining gives another
        rm = seed_dir(a, r[0]) / rm_name(r[1], r[2])  # labeller, so its cells are all redone
        if (rm / "checks.json").exists() and not (rm / "stage.json").exists():
            keys = [*map(str, a.budgets), "all"] if r[1] == "rm_large" else [str(r[2])]
            for k in keys:  # cells/main/<arm>/<budget>/<method>/<setting>/seed_<s>.json
                for path in (Path(a.output_dir) / "cells" / "main" / r[1] / k).glob(f"*/*/seed_{r[0]}.json"):  # fmt: skip
                    path.unlink()
    run_all(pool, [(train_reward_model, a, *r) for r in rms])
    TRAINED.update(rms)
    return run_all(pool, jobs, on_done, failed)


def restore(a: Args) -> dict:
    """Write back into output_dir the per-cell results that results.json, details.json and headroom.json
    (committed in parts) hold and output_dir lacks, when they are of this study's settings: a session
    that lost the git-ignored work/ resumes from the repository. Only missing files are written; a
    restored cell holds the fields the report reads. -> the restored details (or {})."""
    out = Path(a.results_dir)
    if a.quick or not (out / "details.json").exists():
        return {}
    details = json.loads((out / "details.json").read_text())
    if details.get("settings") != study_settings(a):
        return {}
    results = json.loads((out / "results.json").read_text())
    seeds = results["seeds"]
    gate = json.loads((out / "headroom.json").read_text())
    put = lambda path, value: path.exists() or write_json(path, value)
    if len(a.tuning_seeds) == 1 and gate["tuning_seeds"] == a.tuning_seeds:
        s0 = a.tuning_seeds[0]
        put(seed_dir(a, s0) / "headroom_val.json", gate["headroom"][str(s0)])
        for key, r in details["tuning"]["records"].items():
            arm, b, m = key.split()
            for g, score in r["scores"].items():
                row = {"labeller_score": score, "gold_sampled": r["gold_sampled"][g], "setting": g}
                if (gs := gate["settings"].get(f"{m} {g}")) and (arm, b) == (
                    "gold",
                    str(max(a.budgets)),
                ):
                    row.update({k: gs[k] for k in ("kl_to_sft", "unfinished", "exact")}, cpu_s=gs["cpu_s"][0])  # fmt: skip
                put(cell_path(a, "tune", s0, arm, b, m, g), row)
    chosen = details["tuning"]["chosen"]
    for i, s in enumerate(seeds):
        if results["headroom"]["sft"][i] is not None:
            put(
                seed_dir(a, s) / "headroom_test.json",
                {k: v[i] for k, v in results["headroom"].items()},
            )
        for arm, body in results["arms"].items():
            for b, bb in body["budgets"].items():
                rm = seed_dir(a, s) / rm_name(arm, int(b))
                if arm != "gold" and (rm / "stage.json").exists():
                    continue  # a reward model trained again here: its cells are computed anew
                if len(checks := details["reward_models"].get(f"{arm} {b}", [])) == len(seeds):
                    put(rm / "checks.json", checks[i])
                if bb["baselines"]["best_of_2"][i] is not None:
                    put(cell_path(a, "main", s, arm, int(b), "sft", "baselines"),
                        {k: v[i] for k, v in bb["baselines"].items()})  # fmt: skip
                for m, v in bb["methods"].items():
                    if v["gold_sampled"][i] is None:
                        continue
                    row = {k: x[i] for k, x in v.items()}
                    row.update({k: details[k][arm][b][m][i] for k in ("length_error", "gold_finished", "cpu_s")})  # fmt: skip
                    if m == "sft":
                        put(
                            cell_path(a, "main", s, "gold", "all", "sft", "final"),
                            {**row, "setting": "final"},
                        )
                        continue
                    key = cell_budget(arm, m, int(b))
                    put(cell_path(a, "main", s, arm, key, m, "final"), {**row, "setting": chosen[arm][str(key)][m]})  # fmt: skip
        for v, body in results["ablation"].items():
            if v != "large_batch" and body["gold_sampled"][i] is not None:
                put(cell_path(a, "ablation", s, "gold", min(a.budgets), "ppo", v),
                    {"gold_sampled": body["gold_sampled"][i], "setting": v})  # fmt: skip
    return details


def run_gate(a: Args, pool, start: float) -> dict:
    print(f"[{time.time() - start:6.0f}s] gate: data, SFT and headroom on tuning seeds {a.tuning_seeds}", flush=True)  # fmt: skip
    run_jobs(a, pool, [(headroom, a, s, "val") for s in a.tuning_seeds])
    grid = [(m, setting_name(lr, c)) for m in ("ppo", "dpo_iter") for lr in grid_axes(a, m)[0] for c in grid_axes(a, m)[1]]  # fmt: skip
    first = [(m, setting_name(lr, c)) for m, pts in GATE_ORDER.items() for lr, c in pts]
    order = [g for g in first if g in grid] + [g for g in grid if g not in first]
    out = gate_report(a, order)
    for i in range(0, len(order), 2):  # two settings at a time: stop as soon as one passes
        if out["passed"]:
            break
        batch = order[i : i + 2]
        print(f"[{time.time() - start:6.0f}s] gate: {batch}", flush=True)
        jobs = [(cell, a, "tune", s, "gold", max(a.budgets), m, g) for m, g in batch for s in a.tuning_seeds]  # fmt: skip
        run_jobs(a, pool, jobs, on_done=lambda: gate_report(a, order))
        out = gate_report(a, order)
    b = out["best"]
    print(f"[{time.time() - start:6.0f}s] gate {'PASSED' if out['passed'] else 'not passed'}: best {b} "
          f"share {out['settings'][b]['share'] if b else float('nan'):.3f}", flush=True)  # fmt: skip
    return out


def main(a: Args):
    if a.quick:
        quick_sizes(a)
    if a.estimate:
        print(json.dumps(cost_plan(a), indent=1))
        return
    prepare_dirs(a)
    os.environ.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                      TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")  # fmt: skip
    start = time.time()
    extra: dict = {"settings": study_settings(a), "cost_plan": cost_plan(a)}
    before = {r["seed"]: r for r in restore(a).get("seeds_prepared", [])}
    with ProcessPoolExecutor(max(1, a.jobs), mp_context=get_context("spawn"), initializer=worker_init) as pool:  # fmt: skip
        gate = run_gate(a, pool, start)
        if a.gate:
            return
        if not a.quick:  # the reported seeds run only after the gate and the pre-registration
            if not gate["passed"]:
                raise StudyError(
                    "the headroom gate has not passed (headroom.json); no reported seed runs"
                )
            if preregistration(a)["commit"] is None:
                raise StudyError(f"commit {PREREGISTERED} before any reported seed runs")
            if set(a.seeds) & (set(range(20)) | set(a.tuning_seeds)):
                raise StudyError("reported seeds must be fresh: none of 0-19 or the tuning seeds")
        seeds = list(dict.fromkeys(a.tuning_seeds + a.seeds))
        # a seed's data, SFT and reward models are made when one of its jobs is first run (run_jobs)
        prepared = lambda: [
            PREPARED.get(s) or before[s] for s in seeds if s in PREPARED or s in before
        ]
        print(f"[{time.time() - start:6.0f}s] tuning under every labeller, per budget", flush=True)
        points = tune_points(a)
        if all(len(grid_axes(a, m)[0]) * len(grid_axes(a, m)[1]) == 1 for _, _, m in points):
            records = {p: {"chosen": setting_name(grid_axes(a, p[2])[0][0], grid_axes(a, p[2])[1][0]),
                           "scores": {}, "gold_sampled": {}, "extensions": 0, "on_edge": False} for p in points}  # fmt: skip
        else:  # a one-setting grid (--quick) needs no tuning run
            records = run_tuning(a, pool, points)
        chosen = {}
        for (arm, b, m), r in records.items():
            chosen.setdefault(arm, {}).setdefault(str(b), {})[m] = r["chosen"]
        extra["tuning"] = {"chosen": chosen, "records": {f"{arm} {b} {m}": r for (arm, b, m), r in records.items()}}  # fmt: skip
        write_json(Path(a.output_dir) / "tuning.json", extra["tuning"])

        print(f"[{time.time() - start:6.0f}s] reported cells; results rewritten as cells finish", flush=True)  # fmt: skip
        failed: list = []
        # Two seeds at a time, so results come in whole seeds; first the seeds with a primary
        # contrast's cell left, in two passes: the primary contrasts' cells and the gold arm's at
        # the largest budget (the headroom criterion), then the rest. Of a restored seed with no
        # primary cell left, only the jobs that need no reward model run: its reward models were
        # lost with work/, and a retrained one is another labeller (retraining differs), so a cell
        # it would redo (a changed tuning choice) is left out rather than labelled by another model.
        prim = {(arm, m) for arm, x, y in PRIMARY for m in (x, y)}
        todo = {s: [j for j in seed_jobs(a, s, points, chosen) if not job_seed_and_result(j)[1]] for s in a.seeds}  # fmt: skip
        urgent = {
            s: any(j[0] is final_cell and (j[4], j[6]) in prim for j in todo[s]) for s in a.seeds
        }
        order = sorted(a.seeds, key=lambda s: (not urgent[s], -len(todo[s])))
        first = lambda j: j[0] is headroom or (
            j[0] in (cell, final_cell) and j[2] == "main"
            and ((j[4], j[6]) in prim or (j[4] == "gold" and j[5] in ("all", max(a.budgets))))
        )  # fmt: skip
        passes = [lambda j, s: urgent[s] and first(j), lambda j, s: urgent[s] or job_labeller(j) is None]  # fmt: skip
        for i, keep in [(i, k) for k in passes for i in range(0, len(order), 2)]:
            jobs = [
                j for s in order[i : i + 2] for j in seed_jobs(a, s, points, chosen) if keep(j, s)
            ]
            report = lambda: write_report(a, {**extra, "seeds_prepared": prepared()}, time.time() - start, final=False)  # fmt: skip
            run_jobs(a, pool, jobs, on_done=report, failed=failed)
        extra["seeds_prepared"] = prepared()
    write_report(a, extra, time.time() - start, final=not failed)
    if failed:
        raise StudyError(f"{len(failed)} cells failed (run again to retry them), e.g. {failed[0]}")
    print(f"[{time.time() - start:6.0f}s] done: {Path(a.results_dir) / 'results.md'}", flush=True)


def seed_jobs(a: Args, s: int, points: list, chosen: dict) -> list:
    """Every reported job of seed s: headroom, SFT, baselines, the chosen settings' cells, ablation."""
    jobs = [(headroom, a, s, "test"), (cell, a, "main", s, "gold", "all", "sft", "final")]
    jobs += [(baselines, a, s, arm, b) for arm in ARMS for b in a.budgets]
    jobs += [(final_cell, a, "main", s, arm, b, m, chosen[arm][str(b)][m]) for arm, b, m in points]
    jobs += [(cell, a, "ablation", s, "gold", min(a.budgets), "ppo", v) for v in ABLATION if v != "large_batch"]  # fmt: skip
    return jobs


def final_cell(a: Args, kind: str, seed: int, arm: str, budget, method: str, setting: str) -> dict:
    """A reported cell at the chosen setting, also stored as 'final' so the report finds it."""
    path = cell_path(a, kind, seed, arm, budget, method, "final")
    if path.exists() and (done := json.loads(path.read_text()))["setting"] == setting:
        return done
    result = cell(a, kind, seed, arm, budget, method, setting)
    write_json(path, {**result, "setting": setting})
    return result


if __name__ == "__main__":
    import tyro

    try:
        main(tyro.cli(Args))
    except (StudyError, RuntimeError) as e:
        sys.exit(f"error: {e}")
