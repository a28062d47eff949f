"""A laptop-scale test of the paper's claim (PPO > DPO-Iter > DPO) with labellers of known accuracy.

Task and gold reward: task.py (sort a digit string; graded partial credit). Every training stage is
one of the project's scripts (sft.py, reward_model.py, dpo.py, ppo.py), called in-process through
its own `main(tyro.cli(Args, args=[...]))`, i.e. with exactly the command-line flags a user would
type (each stage's flags are in its log and in its `stage.json`).

Design:
1. One rule set. PPO and DPO-Iter train on the same prompts, with the same missing-EOS penalty, the
   same budget of reward queries (PPO rollouts scored = DPO-Iter samples labelled), the same KL
   anchor (the SFT policy: DPO-Iter runs as `--rounds` calls of dpo.py, each from the last policy with
   `--ref_model_name_or_path` = SFT), and the same selection rule (below). DPO gets budget/2 offline
   pairs (the same number of labelled responses) on the same prompts, from an off-policy behaviour
   policy (task.corrupt), labelled by the same labeller.
2. Labellers of known accuracy, as arms: `gold`; `noisy_0.95/0.85/0.75` = gold plus Bradley-Terry
   noise (task.NoisyGold) whose temperature is calibrated per seed so that its pairwise accuracy on
   the SFT policy's own samples (validation prompts, pairs of different gold) is 0.95/0.85/0.75; and
   `reward_model`, a reward model trained by reward_model.py on "human" pairs (Bradley-Terry labels at
   --bt_temperature). Its labeller accuracy is measured on the same SFT-sample pairs.
3. The reward model: 4 layers (--rm_num_layers) against the policy's 2, from an SFT model of its own
   trained on the same demonstrations (the policy-sized one stays near 0.80 held-out accuracy). A
   learning curve over --rm_sizes pairs on the tuning seeds picks the size (the smallest within 0.01
   of the largest's held-out accuracy); every seed's reward model is then checked
   against the bar (held-out accuracy >= 0.85 and within 0.05 of the Bayes ceiling of its noisy
   labels; >= 0.85 on near-correct on-policy pairs; unfinished and over-long answers below the
   correct answer >= 95%). The report says which parts of the bar it meets.
4. Headroom: a small SFT model, briefly trained on strings of up to --max_digits digits, so its
   sampled gold is well below 1; sampled gold (temperature 1) is the primary metric, greedy beside it.
5. Equal tuning effort: a learning rate x (beta or kl_coef) grid per method, run on the
   --tuning_seeds (not reported) under every labeller; for each (labeller, method) the setting with
   the best mean validation score *by that labeller* (missing-EOS penalty applied) is used on every
   reported seed. Gold is only the reported outcome (the tuning table shows it beside each score).
   Every method's model is its final one (no per-seed checkpoint picking, so no method gets more
   selection than another).
6. Statistics: --seeds (>= 10) per cell, paired per seed (the same data, SFT and labeller calibration
   for every method of a seed); mean and 95% t-interval of the per-seed differences PPO - DPO,
   PPO - DPO-Iter, DPO-Iter - DPO; unfinished share and length error per method; the paper's Table 3
   PPO ablation under the gold labeller on the same seeds.

Outputs: results.json (a fixed shape), details.json (reward-model checks, tuning, learning
curve, per-cell CPU seconds, length errors), results.md and gold_vs_accuracy.png, rewritten after
every finished cell, so a long run can be committed in parts. Everything is resumable: a finished
cell (labeller, method, seed) is never redone, and a stage whose recorded settings (`stage.json`:
its flags and the settings of the stages it builds on) differ from the wanted ones is redone.

Cost, measured in CPU seconds per cell (training + evaluation, one thread, the default sizes; medians
of the 2026-11-24 run): DPO 4, DPO-Iter 3, PPO 8 (10 under the reward model, whose 4-layer critic
and scoring cost more), SFT evaluation 0.6; data and both SFT models 30 per seed; the reward model
about 2.1 ms per pair and epoch (250 CPU-s at 40,000 pairs). The full run took 6,921 CPU-s and 60
minutes with --jobs 2 (the reward models, learning curve included, take about 3,950 CPU-s of it).
The stages run in worker processes that import the scripts once (a subprocess per stage would add
about 4 CPU-s each).

    python examples/tiny_pipeline/run.py            # the full study (work/ is git-ignored)
    python examples/tiny_pipeline/run.py --quick    # every stage at tiny sizes, into a temporary directory
"""

import hashlib
import importlib
import json
import math
import os
import random
import shutil
import statistics
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

METHODS = ["sft", "dpo", "dpo_iter", "ppo"]
PAIRS = [("ppo", "dpo"), ("ppo", "dpo_iter"), ("dpo_iter", "dpo")]
ABLATION = ["baseline", "adv_norm", "large_batch", "ref_ema"]
ABLATION_LABELS = {
    "baseline": "baseline PPO (small batch, no adv. norm.)",
    "adv_norm": "+ Adv. Norm.",
    "large_batch": "+ Large Batch (= PPO of the main table)",
    "ref_ema": "+ Ref. EMA",
}
PAPER_TABLE4 = {
    "ppo": 0.718,
    "dpo_iter": 0.678,
    "dpo": 0.611,
}  # paper Table 4 (HH-RLHF-style benchmark)


@dataclass
class Args:
    """The tiny pipeline: SFT, reward model, DPO, DPO-Iter and PPO under labellers of known accuracy,
    on a digit-sorting task with a gold reward. Example: python examples/tiny_pipeline/run.py --quick"""

    output_dir: str | None = None
    """work directory (data, models, logs, per-cell results); default: examples/tiny_pipeline/work,
    or a new temporary directory with --quick"""
    results_dir: str | None = None
    """where results.json, details.json, results.md and the figure go; default: examples/tiny_pipeline,
    or <output_dir>/results with --quick"""
    quick: bool = False
    """every stage at tiny sizes (the test suite runs this); never writes into examples/tiny_pipeline/"""
    restart: bool = False
    """discard a study with other settings in output_dir instead of refusing to touch it"""
    jobs: int = 2
    """worker processes (one CPU thread each)"""
    seeds: list[int] = field(default_factory=lambda: list(range(10, 20)))
    """reported seeds: every (labeller, method) cell runs on each"""
    tuning_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """seeds of the hyper-parameter sweep and the reward model's learning curve (never reported)"""
    accuracies: list[float] = field(default_factory=lambda: [0.95, 0.85, 0.75])
    """pairwise accuracies of the noisy-gold labellers on SFT samples"""
    # ---- task and models ----
    min_digits: int = 4
    max_digits: int = 12
    max_new_tokens: int = 16
    hidden_size: int = 64
    num_layers: int = 2
    num_sft: int = 4000
    sft_steps: int = 250
    sft_learning_rate: float = 2e-3
    # ---- reward model ----
    rm_num_layers: int = 4
    """layers of the reward model, which starts from an SFT model of its own (same data and steps as the
    policy's): a 2-layer one stays near 0.80 held-out accuracy (2026-11-24, seed 0, 40k pairs: 0.797
    against 0.873 for 4 layers, ceiling 0.889)"""
    rm_sizes: list[int] = field(default_factory=lambda: [5000, 10000, 20000, 40000])
    """learning curve: reward models on this many pairs (tuning seeds); the size is picked from it"""
    rm_heldout: int = 1000
    bt_temperature: float = 0.1
    """the 'human' labels of the reward model's data: P(a preferred) = sigmoid((gold(a) - gold(b)) / T)"""
    rm_epochs: float = 3.0
    rm_learning_rate: float = 1e-3
    # ---- the preference stages ----
    rl_prompts: int = 256
    """the prompts PPO, DPO-Iter and DPO all train on"""
    samples_per_prompt: int = 4
    """DPO-Iter samples per prompt and round (best vs worst by the labeller)"""
    rounds: int = 2
    """DPO-Iter rounds; reward-query budget = rounds x rl_prompts x samples_per_prompt = PPO's episodes"""
    dpo_epochs: float = 2.0
    ppo_batch: int = 64
    """rollouts per PPO iteration (the ablation's small batch is a quarter of it)"""
    missing_eos_penalty: float = -1.0
    """score of an unfinished sample under the gold and noisy labellers (the empty answer's gold);
    under the reward model: its mean - 2 std on SFT samples"""
    dpo_grid: list[str] = field(
        default_factory=lambda: [
            f"{lr},{beta}" for lr in ("3e-5", "1e-4", "3e-4") for beta in (0.1, 0.3)
        ]
    )
    """'learning_rate,beta' settings swept for DPO and DPO-Iter"""
    ppo_grid: list[str] = field(
        default_factory=lambda: [
            f"{lr},{kl}" for lr in ("3e-5", "1e-4", "3e-4") for kl in (0.02, 0.1)
        ]
    )
    """'learning_rate,kl_coef' settings swept for PPO"""
    num_val: int = 200
    """validation prompts (labeller calibration, tuning)"""
    num_test: int = 300
    """test prompts (every reported number)"""


def quick_sizes(a: Args):
    a.seeds, a.tuning_seeds, a.accuracies = a.seeds[:1], a.tuning_seeds[:1], [0.85]
    a.max_digits, a.max_new_tokens, a.num_sft, a.sft_steps = 6, 8, 256, 20
    a.rm_sizes, a.rm_heldout, a.rm_epochs = [512, 1024], 32, 2.0
    a.rl_prompts, a.samples_per_prompt, a.rounds, a.dpo_epochs, a.ppo_batch = 16, 2, 2, 1.0, 16
    a.dpo_grid, a.ppo_grid, a.num_val, a.num_test = a.dpo_grid[:1], a.ppo_grid[:1], 16, 16


# ---- directories and recorded settings ----


class StudyError(Exception):
    pass


def study_settings(a: Args) -> dict:
    return {
        k: v
        for k, v in asdict(a).items()
        if k not in ("output_dir", "results_dir", "restart", "jobs")
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
    model, tok, prompts: list, max_new_tokens: int, sample: bool, batch: int = 256
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
                temperature=1.0 if sample else None,
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


def evaluate(
    policy_path, sft_path, prompts: list, a: Args, seed: int, score, penalty: float
) -> dict:
    """Gold of greedy and of sampled (temperature 1) responses; on the sampled ones: KL(policy || SFT)
    (Monte-Carlo: mean of log pi - log pi_sft), unfinished share, |length error| in digits, and the
    labeller's score (`score` on finished responses, `penalty` on unfinished ones: what tuning and
    selection see; gold is only the reported outcome)."""
    import torch

    torch.manual_seed(seed)
    policy, tok = load_policy(policy_path)
    sft, _ = load_policy(sft_path)
    greedy = generate(policy, tok, prompts, a.max_new_tokens, sample=False)
    sampled = generate(policy, tok, prompts, a.max_new_tokens, sample=True)
    pids = [tok(p).input_ids for p in prompts]
    responses = [r for r, _ in sampled]
    kl = []
    for i in range(0, len(prompts), 256):
        kl += (
            response_logps(policy, pids[i : i + 256], responses[i : i + 256])
            - response_logps(sft, pids[i : i + 256], responses[i : i + 256])
        ).tolist()
    texts = [text(tok, r) for r in responses]
    gold_s = [task.gold_reward(p, t) for p, t in zip(prompts, texts)]
    return {
        "gold_greedy": statistics.fmean(
            task.gold_reward(p, text(tok, r)) for p, (r, _) in zip(prompts, greedy)
        ),
        "gold_sampled": statistics.fmean(gold_s),
        "kl_to_sft": statistics.fmean(kl),
        "unfinished": statistics.fmean(0.0 if f else 1.0 for _, f in sampled),
        "length_error": statistics.fmean(
            abs(len(t.split()) - len(task.target(p))) for p, t in zip(prompts, texts)
        ),
        "labeller_score": statistics.fmean(
            s if f else penalty for s, (_, f) in zip(score(prompts, texts), sampled)
        ),
    }


# ---- per seed: data, SFT, labeller calibration, reward-model data ----


def seed_dir(a: Args, seed: int) -> Path:
    return Path(a.output_dir) / f"seed_{seed}"


def prepare_seed(a: Args, seed: int) -> dict:
    """Data, base model and SFT policy of one seed; SFT samples for the labellers' calibration; the
    reward model's pair data (half off-policy corruptions of the answer, half pairs of SFT samples)."""
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
    offline = []  # DPO's off-policy pairs on the same prompts: budget / 2 of them, of different gold
    while len(offline) < a.rounds * a.rl_prompts * a.samples_per_prompt // 2:
        q = rl[len(offline) % len(rl)]
        x, y = (" " + " ".join(task.corrupt(task.target(q), rng)) for _ in range(2))
        if task.gold_reward(q, x) != task.gold_reward(q, y):
            offline.append({"prompt": q, "a": x, "b": y})
    write_jsonl(d / "offline_pairs.jsonl", offline)
    val, test = [new_prompt() for _ in range(a.num_val)], [new_prompt() for _ in range(a.num_test)]
    write_jsonl(d / "val_prompts.jsonl", [{"prompt": q} for q in val])
    write_jsonl(d / "test_prompts.jsonl", [{"prompt": q} for q in test])
    # the SFT policy, and the reward model's own starting point: an SFT model of rm_num_layers layers,
    # trained on the same demonstrations with the same steps
    for name, base, layers in (
        ("sft", "base", a.num_layers),
        ("sft_rm", "base_rm", a.rm_num_layers),
    ):
        run_stage(
            d / name,
            "sft",
            [
                "--model_name_or_path",
                make_base_model(d, a, seed, layers, base),
                "--init_from_scratch",
                "--dataset_name",
                d / "sft.jsonl",
                "--max_steps",
                a.sft_steps,
                "--per_device_train_batch_size",
                32,
                "--learning_rate",
                a.sft_learning_rate,
                "--warmup_ratio",
                0.05,
                "--seed",
                seed,
                "--save_steps",
                0,
                "--logging_steps",
                10,
                "--num_samples",
                0,
            ],
        )
    sft = d / "sft"

    # SFT samples on validation prompts: the pairs every labeller's accuracy is measured on
    import torch

    torch.manual_seed(seed)
    model, tok = load_policy(sft)
    k = 4
    samples = generate(
        model, tok, [q for q in val for _ in range(k)], a.max_new_tokens, sample=True
    )
    calib = []
    for i, q in enumerate(val):
        group = [(text(tok, r), f) for r, f in samples[i * k : (i + 1) * k]]
        for (x, fx), (y, fy) in zip(group[::2], group[1::2]):
            if fx and fy and task.gold_reward(q, x) != task.gold_reward(q, y):
                calib.append({"prompt": q, "a": x, "b": y})
    write_jsonl(d / "calibration_pairs.jsonl", calib)
    gaps = [
        abs(task.gold_reward(c["prompt"], c["a"]) - task.gold_reward(c["prompt"], c["b"]))
        for c in calib
    ]
    temperatures = {f"{acc}": task.calibrate_temperature(gaps, acc) for acc in a.accuracies}

    # the reward model's "human" data: train pairs first, held-out pairs after them. Even rows are
    # pairs of SFT samples, odd rows corruptions of the answer, so every prefix (each size of the
    # learning curve) and the held-out pairs come from the same mix.
    n = max(a.rm_sizes) + a.rm_heldout
    rm_prompts = [new_prompt() for _ in range(n)]
    sft_samples = generate(
        model, tok, [q for q in rm_prompts[::2] for _ in range(2)], a.max_new_tokens, sample=True
    )
    rows = []
    for i, q in enumerate(rm_prompts):  # every pair distinct, so train and held-out never overlap
        x, y = (
            (text(tok, sft_samples[i + j][0]) or " " for j in range(2))  # pair i // 2 of samples
            if i % 2 == 0
            else (" ", " ")
        )
        while x == y:  # identical SFT samples, or the off-policy half: corruptions of the answer
            x, y = (" " + " ".join(task.corrupt(task.target(q), rng)) for _ in range(2))
        gx, gy = task.gold_reward(q, x), task.gold_reward(q, y)
        x_wins = rng.random() < 1 / (1 + math.exp(-max(min((gx - gy) / a.bt_temperature, 50), -50)))
        win, lose = (x, y) if x_wins else (y, x)
        rows.append({"prompt": q, "chosen": win, "rejected": lose})
    write_jsonl(d / "rm_pairs.jsonl", rows)
    info = {
        "seed": seed,
        "temperatures": temperatures,
        "calibration_pairs": len(calib),
        "rm_train_available": len(rows) - a.rm_heldout,
        "cpu_s": time.process_time() - start,
    }
    write_json(info_path, info)
    return info


def train_reward_model(a: Args, seed: int, n_pairs: int) -> dict:
    """reward_model.py on the first n_pairs "human" pairs, then the checks of the design's bar."""
    d = seed_dir(a, seed)
    out = d / f"reward_model_{n_pairs}"
    result_path = out / "checks.json"
    total = len(read_jsonl(d / "rm_pairs.jsonl"))
    argv = [
        "--model_name_or_path",
        d / "sft_rm",
        "--dataset_name",
        d / "rm_pairs.jsonl",
        "--train_split",
        f"train[:{n_pairs}]",
        "--eval_split",
        f"train[{total - a.rm_heldout}:]",
        "--num_train_epochs",
        a.rm_epochs,
        "--per_device_train_batch_size",
        64,
        "--learning_rate",
        a.rm_learning_rate,
        "--warmup_ratio",
        0.05,
        "--seed",
        seed,
        "--save_steps",
        0,
        "--logging_steps",
        20,
        "--eval_steps",
        10**6,
    ]
    want = {
        "script": "reward_model",
        "argv": [str(x) for x in argv],
        "upstream": [json.loads((d / "sft_rm" / "stage.json").read_text())],
    }
    if stage_done(out, want) and result_path.exists():
        return json.loads(result_path.read_text())
    start = time.process_time()
    run_stage(out, "reward_model", argv, upstream=(d / "sft_rm",))
    held = read_jsonl(d / "rm_pairs.jsonl")[total - a.rm_heldout :]
    sc = rm_scores(
        out,
        [r["prompt"] for r in held] * 2,
        [r["chosen"] for r in held] + [r["rejected"] for r in held],
    )
    heldout_acc = statistics.fmean(c > r for c, r in zip(sc[: len(held)], sc[len(held) :]))
    ceiling = statistics.fmean(
        1
        / (
            1
            + math.exp(
                -min(
                    abs(
                        task.gold_reward(r["prompt"], r["chosen"])
                        - task.gold_reward(r["prompt"], r["rejected"])
                    )
                    / a.bt_temperature,
                    50,
                )
            )
        )
        for r in held
    )
    calib = read_jsonl(d / "calibration_pairs.jsonl")
    sa = rm_scores(
        out, [c["prompt"] for c in calib] * 2, [c["a"] for c in calib] + [c["b"] for c in calib]
    )
    right = [
        (sa[i] > sa[i + len(calib)])
        == (task.gold_reward(c["prompt"], c["a"]) > task.gold_reward(c["prompt"], c["b"]))
        for i, c in enumerate(calib)
    ]
    near = [
        ok
        for ok, c in zip(right, calib)
        if min(task.gold_reward(c["prompt"], c["a"]), task.gold_reward(c["prompt"], c["b"])) >= 0.5
    ]
    # probes on validation prompts: the correct answer against over-long answers (finished) and
    # against unfinished ones (which the pipeline scores with the missing-EOS penalty)
    rng = random.Random(seed + 7)
    val = [r["prompt"] for r in read_jsonl(d / "val_prompts.jsonl")]
    longer = [
        task.answer(q) + "".join(f" {rng.randrange(10)}" for _ in range(rng.randint(1, 3)))
        for q in val
    ]
    probe = rm_scores(out, val * 2, [task.answer(q) for q in val] + longer)
    penalty = statistics.fmean(sa) - 2 * statistics.pstdev(sa)
    result = {
        "n_pairs": n_pairs,
        "heldout_accuracy": heldout_acc,
        "noise_ceiling": ceiling,
        "labeller_accuracy": statistics.fmean(right),
        "near_correct_accuracy": statistics.fmean(near) if near else float("nan"),
        "overlong_below_correct": statistics.fmean(
            c > x for c, x in zip(probe[: len(val)], probe[len(val) :])
        ),
        "unfinished_below_correct": statistics.fmean(c > penalty for c in probe[: len(val)]),
        "missing_eos_penalty": penalty,
        "cpu_s": time.process_time() - start,
    }
    write_json(result_path, result)
    return result


# ---- the labellers and the three preference methods ----


def labeller(a: Args, seed: int, arm: str) -> tuple:
    """-> (flags that make dpo.py/ppo.py use this labeller, its missing-EOS penalty, a Python scorer)."""
    d = seed_dir(a, seed)
    if arm == "gold":
        return (
            ["--reward_fn", f"{HERE / 'task.py'}:gold_reward_fn"],
            a.missing_eos_penalty,
            task.gold_reward_fn,
        )
    if arm == "reward_model":
        checks = json.loads((d / "reward_model" / "checks.json").read_text())
        rm = d / "reward_model"
        return (
            ["--reward_model_name_or_path", rm],
            checks["missing_eos_penalty"],
            lambda prompts, completions: rm_scores(rm, prompts, completions),
        )
    temperature = json.loads((d / "seed.json").read_text())["temperatures"][
        arm.removeprefix("noisy_")
    ]
    path = d / "labellers" / f"{arm}.py"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            f"import sys\nsys.path.insert(0, {str(HERE)!r})\nimport task\n\n"
            f"label = task.NoisyGold(temperature={temperature!r}, seed={seed})\n"
        )
    return (
        ["--reward_fn", f"{path}:label"],
        a.missing_eos_penalty,
        task.NoisyGold(temperature, seed + 1_000_003),
    )


def train(
    a: Args,
    seed: int,
    arm: str,
    method: str,
    lr: float,
    coef: float,
    out: Path,
    variant: str = "main",
) -> Path:
    """Train one method from the seed's SFT policy under one labeller; -> the final policy's directory."""
    d = seed_dir(a, seed)
    sft = d / "sft"
    flags, penalty, score = labeller(a, seed, arm)
    upstream = (sft,) + ((d / "reward_model",) if arm == "reward_model" else ())
    common = ["--seed", seed, "--save_steps", 0, "--logging_steps", 10]
    if method == "dpo":
        tag = fingerprint([json.loads((Path(u) / "stage.json").read_text()) for u in upstream])
        pairs = d / "labelled" / f"offline_{arm}_{tag}.jsonl"  # relabelled if the labeller changes
        if not pairs.exists():
            raw = read_jsonl(d / "offline_pairs.jsonl")
            s = score([r["prompt"] for r in raw] * 2, [r["a"] for r in raw] + [r["b"] for r in raw])
            write_jsonl(
                pairs,
                [
                    {
                        "prompt": r["prompt"],
                        "chosen": r["a"] if s[i] > s[i + len(raw)] else r["b"],
                        "rejected": r["b"] if s[i] > s[i + len(raw)] else r["a"],
                    }
                    for i, r in enumerate(raw)
                ],
            )
        return run_stage(
            out,
            "dpo",
            [
                *common,
                "--model_name_or_path",
                sft,
                "--dataset_name",
                pairs,
                "--beta",
                coef,
                "--learning_rate",
                lr,
                "--num_train_epochs",
                a.dpo_epochs,
                "--warmup_ratio",
                0.1,
                "--per_device_train_batch_size",
                32,
                "--eval_steps",
                10**6,
            ],
            upstream,
        )
    if method == "dpo_iter":  # rounds of on-policy sampling, each anchored to SFT
        policy = sft
        for r in range(1, a.rounds + 1):
            policy = run_stage(
                out / f"round_{r}",
                "dpo",
                [
                    *["--seed", seed * 100 + r, "--save_steps", 0, "--logging_steps", 10],
                    "--model_name_or_path",
                    policy,
                    "--ref_model_name_or_path",
                    sft,
                    "--dataset_name",
                    d / "rl_prompts.jsonl",
                    *flags,
                    "--missing_eos_penalty",
                    penalty,
                    "--samples_per_prompt",
                    a.samples_per_prompt,
                    "--max_new_tokens",
                    a.max_new_tokens,
                    "--beta",
                    coef,
                    "--learning_rate",
                    lr,
                    "--num_train_epochs",
                    1,
                    "--warmup_ratio",
                    0.1,
                    "--per_device_train_batch_size",
                    32,
                    "--eval_steps",
                    10**6,
                ],
                upstream + ((policy,) if r > 1 else ()),
            )
        return policy
    batch = a.ppo_batch // 4 if variant in ("baseline", "adv_norm") else a.ppo_batch
    extra = {
        "baseline": ["--no-whiten_advantages", "--ref_ema", 0],
        "adv_norm": ["--ref_ema", 0],
        "main": ["--ref_ema", 0],
        "large_batch": ["--ref_ema", 0],
        "ref_ema": ["--ref_ema", 0.01],
    }[variant]
    return run_stage(
        out,
        "ppo",
        [
            *common,
            "--model_name_or_path",
            sft,
            "--dataset_name",
            d / "rl_prompts.jsonl",
            *flags,
            "--missing_eos_penalty",
            penalty,
            "--max_new_tokens",
            a.max_new_tokens,
            "--total_episodes",
            a.rounds * a.rl_prompts * a.samples_per_prompt,
            "--per_device_prompt_batch_size",
            batch,
            "--num_minibatches",
            4,
            "--per_device_train_batch_size",
            max(1, batch // 4),
            "--learning_rate",
            lr,
            "--critic_learning_rate",
            3 * lr,
            "--kl_coef",
            coef,
            "--eval_steps",
            10**6,
            *extra,
        ],
        upstream,
    )


def cell(a: Args, kind: str, seed: int, arm: str, method: str, setting: str) -> dict:
    """One (kind, labeller, method, setting, seed) cell: train (unless SFT), evaluate, save its result.
    kind: 'tune' (validation prompts), 'main' or 'ablation' (test prompts)."""
    path = cell_path(a, kind, seed, arm, method, setting)
    if path.exists():
        return json.loads(path.read_text())
    start = time.process_time()
    d = seed_dir(a, seed)
    lr, coef = (
        (float(x) for x in setting.split(","))
        if setting not in ABLATION and method != "sft"
        else (0.0, 0.0)
    )
    if kind == "ablation":
        lr, coef = (float(x) for x in chosen_settings(a)["gold"]["ppo"].split(","))
    out = d / "runs" / kind / arm / method / setting.replace(",", "_")
    policy = (
        d / "sft"
        if method == "sft"
        else train(
            a, seed, arm, method, lr, coef, out, variant=setting if kind == "ablation" else "main"
        )
    )
    split = "val" if kind == "tune" else "test"
    prompts = [r["prompt"] for r in read_jsonl(d / f"{split}_prompts.jsonl")]
    _, penalty, score = labeller(a, seed, arm)
    result = {
        **evaluate(policy, d / "sft", prompts, a, seed, score, penalty),
        "cpu_s": time.process_time() - start,
    }
    write_json(path, result)
    return result


def cell_path(a: Args, kind: str, seed: int, arm: str, method: str, setting: str) -> Path:
    return (
        Path(a.output_dir)
        / "cells"
        / kind
        / arm
        / method
        / setting.replace(",", "_")
        / f"seed_{seed}.json"
    )


def chosen_settings(a: Args) -> dict:
    return json.loads((Path(a.output_dir) / "tuning.json").read_text())["chosen"]


def link_reward_model(a: Args, seed: int, n_pairs: int) -> dict:
    """Train the seed's reward model at the chosen size; seed_S/reward_model points at it."""
    checks = train_reward_model(a, seed, n_pairs)
    link = seed_dir(a, seed) / "reward_model"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(f"reward_model_{n_pairs}")
    return checks


# ---- statistics and the report ----

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


def fmt(values: list) -> str:
    if not values:
        return "-"
    m, h = mean_ci(values)
    return f"{m:.3f}" if math.isnan(h) else f"{m:.3f} ± {h:.3f}"


def collect(a: Args) -> tuple:
    """results.json (its fixed shape, only seeds whose every cell of an arm has finished) and details."""
    arms = ["gold"] + [f"noisy_{acc}" for acc in a.accuracies] + ["reward_model"]
    load = lambda *k: (
        json.loads(cell_path(a, *k).read_text()) if cell_path(a, *k).exists() else None
    )
    results = {"seeds": list(a.seeds), "arms": {}, "ablation": {}}
    details = {"length_error": {}, "cells_done": 0, "cpu_s": {}}
    for arm in arms:
        acc = []
        for seed in a.seeds:
            info_path = seed_dir(a, seed) / "seed.json"
            if arm == "gold":
                acc.append(1.0)
            elif (
                arm == "reward_model"
                and (seed_dir(a, seed) / "reward_model" / "checks.json").exists()
            ):
                acc.append(
                    json.loads((seed_dir(a, seed) / "reward_model" / "checks.json").read_text())[
                        "labeller_accuracy"
                    ]
                )
            elif arm.startswith("noisy_") and info_path.exists():
                acc.append(float(arm.removeprefix("noisy_")))
        methods = {}
        for method in METHODS:
            rows = [
                load("main", seed, "gold" if method == "sft" else arm, method, "final")
                for seed in a.seeds
            ]
            details["cells_done"] += (
                sum(r is not None for r in rows) if (method != "sft" or arm == "gold") else 0
            )
            methods[method] = {
                k: [r[k] if r else None for r in rows]
                for k in ("gold_greedy", "gold_sampled", "kl_to_sft", "unfinished")
            }
            details["length_error"].setdefault(arm, {})[method] = [
                r["length_error"] if r else None for r in rows
            ]
            details["cpu_s"].setdefault(arm, {})[method] = [r["cpu_s"] if r else None for r in rows]
        results["arms"][arm] = {
            "labeller_accuracy": statistics.fmean(acc) if acc else None,
            "methods": methods,
        }
    for variant in ABLATION:
        rows = [
            load("main", seed, "gold", "ppo", "final")
            if variant == "large_batch"
            else load("ablation", seed, "gold", "ppo", variant)
            for seed in a.seeds
        ]
        details["cells_done"] += sum(r is not None for r in rows) if variant != "large_batch" else 0
        results["ablation"][variant] = {
            "gold_sampled": [r["gold_sampled"] if r else None for r in rows]
        }
    return results, details


def paired(results: dict, arm: str, x: str, y: str, metric: str = "gold_sampled") -> list:
    m = results["arms"][arm]["methods"]
    return [p - q for p, q in zip(m[x][metric], m[y][metric]) if p is not None and q is not None]


def verdict(diffs: list, x: str, y: str) -> str:
    if len(diffs) < 2:
        return "not enough seeds yet"
    m, h = mean_ci(diffs)
    name = {"ppo": "PPO", "dpo": "DPO", "dpo_iter": "DPO-Iter", "sft": "SFT"}
    if m - h > 0:
        return f"{name[x]} better"
    if m + h < 0:
        return f"{name[y]} better"
    return "not resolved"


def write_report(a: Args, extra: dict, wall: float, final: bool):
    results, details = collect(a)
    details.update(extra)
    out = Path(a.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    write_json(out / "details.json", details)
    names = {"sft": "SFT", "dpo": "DPO", "dpo_iter": "DPO-Iter", "ppo": "PPO"}
    done = [v for v in results["arms"]["gold"]["methods"]["sft"]["gold_sampled"] if v is not None]
    lines = [
        (
            f"# Tiny pipeline: PPO vs DPO-Iter vs DPO under labellers of known accuracy "
            f"({'quick smoke run' if a.quick else 'full run'}{'' if final else ', PARTIAL: still running'})"
        ),
        "",
        (
            "Produced by `examples/tiny_pipeline/run.py` from the run's own cells (design: its docstring). "
            f"Seeds {a.seeds} ({len(done)} with SFT evaluated); {details['cells_done']} trained cells finished; "
            f"wall time so far {wall / 60:.1f} min. Every number: mean over seeds ± half-width of the 95% "
            f"t-interval, on {a.num_test} test prompts per seed. Gold reward in [-1, 1]; 'sampled' = "
            "temperature 1 (the primary metric), 'greedy' beside it. KL = Monte-Carlo KL(policy || SFT) "
            "per response. Unfinished = share of sampled responses without EOS; length error = mean "
            "|digits - target digits| of sampled responses."
        ),
        "",
    ]
    rm = extra.get("reward_model", {})
    if rm.get("per_seed"):
        checks = rm["per_seed"]
        get = lambda k: [c[k] for c in checks if not math.isnan(c[k])]
        gap = [c["noise_ceiling"] - c["heldout_accuracy"] for c in checks]
        lines += [
            "## The reward model",
            "",
            "Learning curve on the tuning seeds (held-out accuracy by number of pairs): "
            + ", ".join(f"{n}: {fmt(v)}" for n, v in rm["learning_curve"].items())
            + f". Chosen size: {rm['chosen_size']} pairs.",
            "",
            "| check (per seed, reported seeds) | value | bar | met on seeds |",
            "| --- | --- | --- | --- |",
            (
                f"| held-out accuracy | {fmt(get('heldout_accuracy'))} | >= 0.85 | "
                f"{sum(v >= 0.85 for v in get('heldout_accuracy'))}/{len(checks)} |"
            ),
            (
                f"| noise ceiling - held-out accuracy | {fmt(gap)} (ceiling {fmt(get('noise_ceiling'))}) | <= 0.05 | "
                f"{sum(g <= 0.05 for g in gap)}/{len(checks)} |"
            ),
            (
                f"| accuracy on near-correct SFT-sample pairs (both gold >= 0.5) | {fmt(get('near_correct_accuracy'))} "
                f"| >= 0.85 | {sum(v >= 0.85 for v in get('near_correct_accuracy'))}/{len(checks)} |"
            ),
            (
                f"| over-long answer scored below the correct one | {fmt(get('overlong_below_correct'))} | >= 0.95 | "
                f"{sum(v >= 0.95 for v in get('overlong_below_correct'))}/{len(checks)} |"
            ),
            (
                f"| unfinished answer (missing-EOS penalty) below the correct one | "
                f"{fmt(get('unfinished_below_correct'))} | >= 0.95 | "
                f"{sum(v >= 0.95 for v in get('unfinished_below_correct'))}/{len(checks)} |"
            ),
            f"| pairwise accuracy on SFT-sample pairs (its labeller accuracy) | {fmt(get('labeller_accuracy'))} | - | - |",
            "",
        ]
    if extra.get("tuning"):
        lines += [
            "## Tuning (tuning seeds, validation prompts; each labeller picks by its own score)",
            "",
            (
                "Each cell: the labeller's mean validation score (missing-EOS penalty included), then"
                " in brackets the gold reward of the same runs (reported, never used to choose);"
                " * = chosen."
            ),
            "",
            "| labeller | method | settings (lr, beta or kl_coef): labeller score [gold] |",
            "| --- | --- | --- |",
        ]
        for arm, by_m in extra["tuning"]["scores"].items():
            for method, rows in by_m.items():
                gold = extra["tuning"]["gold_sampled"][arm][method]
                cells = [
                    f"{g}{'*' if extra['tuning']['chosen'][arm][method] == g else ''}: "
                    f"{statistics.fmean(v):.3f} [{statistics.fmean(gold[g]):.3f}]"
                    for g, v in rows.items()
                ]
                lines.append(f"| {arm} | {names[method]} | {'; '.join(cells)} |")
        lines.append("")
    lines += ["## Main table", ""]
    for arm, body in results["arms"].items():
        acc = body["labeller_accuracy"]
        lines += [
            f"### Labeller `{arm}` (pairwise accuracy on SFT samples {acc:.3f})"
            if acc is not None
            else f"### Labeller `{arm}`",
            "",
            "| method | gold (sampled) | gold (greedy) | KL to SFT | unfinished | length error |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for method in METHODS:
            m = body["methods"][method]

            def vals(k, m=m):
                return [v for v in m[k] if v is not None]

            le = [v for v in details["length_error"][arm][method] if v is not None]
            lines.append(
                f"| {names[method]} | {fmt(vals('gold_sampled'))} | {fmt(vals('gold_greedy'))} | "
                f"{fmt(vals('kl_to_sft'))} | {fmt(vals('unfinished'))} | {fmt(le)} |"
            )
        lines += [
            "",
            "| paired difference (per seed) | gold (sampled) | gold (greedy) | verdict (sampled) |",
            "| --- | --- | --- | --- |",
        ]
        for x, y in PAIRS:
            ds, dg = paired(results, arm, x, y), paired(results, arm, x, y, "gold_greedy")
            lines.append(
                f"| {names[x]} - {names[y]} | {fmt(ds)} | {fmt(dg)} | {verdict(ds, x, y)} |"
            )
        lines.append("")
    lines += [
        "## Table 3 ablation (gold labeller, cumulative)",
        "",
        "| variant | gold (sampled) | difference to the previous row (paired) |",
        "| --- | --- | --- |",
    ]
    prev = None
    for variant in ABLATION:
        vals = results["ablation"][variant]["gold_sampled"]
        diff = (
            [p - q for p, q in zip(vals, prev) if p is not None and q is not None] if prev else []
        )
        lines.append(
            f"| {ABLATION_LABELS[variant]} | {fmt([v for v in vals if v is not None])} | {fmt(diff)} |"
        )
        prev = vals
    lines += [
        "",
        "## Against the paper",
        "",
        (
            "Paper Table 4 (their benchmark, reward-model labeller): PPO 0.718 > DPO-Iter 0.678 > DPO 0.611. "
            "Paper Table 3: each of advantage normalization, large batch and reference EMA adds to PPO. "
            "Here, per labeller (95% intervals of paired per-seed differences in sampled gold):"
        ),
        "",
    ]
    for arm in results["arms"]:
        parts = [
            f"{names[x]} - {names[y]} {fmt(paired(results, arm, x, y))} ({verdict(paired(results, arm, x, y), x, y)})"
            for x, y in PAIRS
        ]
        agree = all(
            verdict(paired(results, arm, x, y), x, y) == f"{names[x]} better" for x, y in PAIRS
        )
        lines.append(
            f"- `{arm}`: "
            + "; ".join(parts)
            + (
                ": the paper's ordering holds."
                if agree
                else ": the paper's full ordering is not shown here."
            )
        )
    lines += ["", "![gold reward against labeller accuracy](gold_vs_accuracy.png)", ""]
    (out / "results.md").write_text("\n".join(lines))
    plot(results, out / "gold_vs_accuracy.png")


def plot(results: dict, path: Path):
    """Left: each method's gold reward against the labeller's accuracy (gold and noisy gold joined by
    lines; the learned reward model, a different kind of labeller, as lone markers). Right: the paired
    per-seed differences, whose intervals are the ones that decide (between-seed spread cancels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"sft": "SFT", "dpo": "DPO", "dpo_iter": "DPO-Iter", "ppo": "PPO"}
    arms = [a for a, body in results["arms"].items() if body["labeller_accuracy"] is not None]
    acc = lambda arm: results["arms"][arm]["labeller_accuracy"]
    noise = sorted((a for a in arms if a != "reward_model"), key=acc)  # joined by lines
    learned = [a for a in arms if a == "reward_model"]  # lone markers
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))

    def draw(ax, arm_list, values, style, label, connect):
        points = [(acc(a), *mean_ci(v)) for a in arm_list if (v := values(a))]
        if points:
            xs, ys, hs = zip(*points)
            errors = [0 if math.isnan(h) else h for h in hs]
            fmt = style if connect else style.rstrip("-:")  # lone markers: no line
            ax.errorbar(xs, ys, yerr=errors, fmt=fmt, label=label, capsize=3)

    for method, style in zip(METHODS, ["k:", "C0o-", "C1s-", "C2^-"]):
        vals = lambda a, m=method: [
            v for v in results["arms"][a]["methods"][m]["gold_sampled"] if v is not None
        ]
        draw(left, noise, vals, style, names[method], True)
        draw(left, learned, vals, style, None, False)
    for (x, y), style in zip(PAIRS, ["C3o-", "C4s-", "C5^-"]):
        diffs = lambda a, x=x, y=y: paired(results, a, x, y)
        label = f"{names[x]} - {names[y]}"
        draw(right, noise, diffs, style, label, True)
        draw(right, learned, diffs, style, None, False)
    right.axhline(0, color="grey", lw=0.8)
    for ax in (left, right):
        ax.set_xlabel(
            "labeller pairwise accuracy on SFT samples\n(lone markers: the learned reward model)"
        )
        ax.legend(fontsize=8)
    left.set_ylabel("gold reward, sampled (test prompts)")
    left.set_title("Gold reward by method (mean, 95% CI over seeds)")
    right.set_ylabel("paired difference in sampled gold")
    right.set_title("Paired per-seed differences (mean, 95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the study ----


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


def main(a: Args):
    if a.quick:
        quick_sizes(a)
    prepare_dirs(a)
    os.environ.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TQDM_DISABLE="1",
    )
    start = time.time()
    extra: dict = {"settings": study_settings(a)}
    with ProcessPoolExecutor(
        max(1, a.jobs), mp_context=get_context("spawn"), initializer=worker_init
    ) as pool:
        print(
            f"[{time.time() - start:6.0f}s] data and SFT for {len(a.tuning_seeds) + len(a.seeds)} seeds",
            flush=True,
        )
        seeds = list(dict.fromkeys(a.tuning_seeds + a.seeds))
        extra["seeds_prepared"] = run_all(pool, [(prepare_seed, a, s) for s in seeds])

        print(f"[{time.time() - start:6.0f}s] reward-model learning curve", flush=True)
        grid = [(n, s) for n in a.rm_sizes for s in a.tuning_seeds]
        curve_rows = run_all(pool, [(train_reward_model, a, s, n) for n, s in grid])
        curve = {
            n: [r["heldout_accuracy"] for (m, _), r in zip(grid, curve_rows) if m == n]
            for n in a.rm_sizes
        }
        best = statistics.fmean(curve[max(a.rm_sizes)])
        size = min(n for n in a.rm_sizes if statistics.fmean(curve[n]) >= best - 0.01)
        # every seed's reward model at that size; the tuning seeds' ones label their tuning runs
        checks = run_all(pool, [(link_reward_model, a, s, size) for s in seeds])
        checks = [c for s, c in zip(seeds, checks) if s in a.seeds]
        extra["reward_model"] = {"learning_curve": curve, "chosen_size": size, "per_seed": checks}

        print(f"[{time.time() - start:6.0f}s] tuning sweep under every labeller", flush=True)
        arms = ["gold", "reward_model"] + [f"noisy_{acc}" for acc in a.accuracies]
        grids = {"dpo": a.dpo_grid, "dpo_iter": a.dpo_grid, "ppo": a.ppo_grid}
        jobs = [
            (cell, a, "tune", s, arm, m, g)
            for arm in arms
            for m, gs in grids.items()
            for g in gs
            for s in a.tuning_seeds
        ]
        rows = run_all(pool, jobs)

        def per_setting(key: str) -> dict:  # {labeller: {method: {setting: [per tuning seed]}}}
            return {
                arm: {
                    m: {g: [r[key] for j, r in zip(jobs, rows) if j[4:] == (arm, m, g)] for g in gs}
                    for m, gs in grids.items()
                }
                for arm in arms
            }

        # the labeller's own validation score picks each (labeller, method)'s setting; the gold
        # outcome of the same runs is reported beside it, never used to choose
        scores, gold = per_setting("labeller_score"), per_setting("gold_sampled")
        chosen = {
            arm: {m: max(gs, key=lambda g: statistics.fmean(gs[g])) for m, gs in by_m.items()}
            for arm, by_m in scores.items()
        }
        extra["tuning"] = {
            "scores": scores,
            "gold_sampled": gold,
            "chosen": chosen,
            "cpu_s": {" ".join(map(str, j[3:])): r["cpu_s"] for j, r in zip(jobs, rows)},
        }
        write_json(Path(a.output_dir) / "tuning.json", extra["tuning"])

        print(
            f"[{time.time() - start:6.0f}s] main cells and ablation; results rewritten as cells finish",
            flush=True,
        )
        jobs = [(cell, a, "main", s, "gold", "sft", "final") for s in a.seeds]
        jobs += [
            (cell, a, "main", s, arm, m, chosen[arm][m])
            for arm in arms
            for s in a.seeds
            for m in ("ppo", "dpo_iter", "dpo")
        ]
        jobs += [
            (cell, a, "ablation", s, "gold", "ppo", v)
            for v in ABLATION
            if v != "large_batch"
            for s in a.seeds
        ]
        jobs = [
            j
            for j in jobs
            if not cell_path(a, *j[2:]).exists()
            and not (j[2] == "main" and cell_path(a, "main", j[3], j[4], j[5], "final").exists())
        ]
        failed: list = []
        run_all(
            pool,
            [(final_cell, *j[1:]) if j[2] == "main" else j for j in jobs],
            on_done=lambda: write_report(a, extra, time.time() - start, final=False),
            failed=failed,
        )
    write_report(a, extra, time.time() - start, final=not failed)
    if failed:
        raise StudyError(f"{len(failed)} cells failed (run again to retry them), e.g. {failed[0]}")
    print(f"[{time.time() - start:6.0f}s] done: {Path(a.results_dir) / 'results.md'}", flush=True)


def final_cell(a: Args, kind: str, seed: int, arm: str, method: str, setting: str) -> dict:
    """A main cell at the chosen setting, stored under the name 'final' so results can find it."""
    result = cell(a, kind, seed, arm, method, setting)
    write_json(cell_path(a, kind, seed, arm, method, "final"), {**result, "setting": setting})
    return result


if __name__ == "__main__":
    import tyro

    try:
        main(tyro.cli(Args))
    except (StudyError, RuntimeError) as e:
        sys.exit(f"error: {e}")
