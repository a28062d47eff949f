"""A laptop-scale RLHF study with a known gold reward: SFT -> reward model -> PPO, DPO and DPO-Iter.

The task: sort a short string of digits ("sort 3 1 4 1 5 =" -> "1 1 3 4 5"). The gold reward gives
partial credit per position and charges for a wrong length, so it is graded, not 0/1 (`gold_reward`).
Everything the paper's comparison needs is here, small enough for 2 CPU cores:
  1. SFT from scratch (`sft.py --init_from_scratch`) on correct demonstrations, briefly, so the SFT
     policy is imperfect and there is room to improve;
  2. preference pairs from a *behaviour policy that is not the SFT policy* (a corruptor that perturbs
     the right answer), labelled by the gold reward with Bradley-Terry noise: DPO trains on these
     off-policy pairs, which is the distribution shift of paper Sec. 4.3;
  3. a reward model (`reward_model.py`) on those pairs; PPO (`ppo.py`) against it; DPO (`dpo.py`) on the
     pairs; DPO-Iter (`dpo.py --iterations`) on its own samples labelled by the reward model;
  4. the PPO ablation of paper Table 3: baseline (small batch, no advantage normalization, no
     reference EMA), + advantage normalization, + large batch, + reference EMA (= full PPO).
Every policy is then scored on held-out prompts with the gold reward and its KL to the SFT policy.

    python examples/tiny_pipeline/run.py            # full study, results.md + plot in this folder
    python examples/tiny_pipeline/run.py --quick    # a smoke run of every stage (the test suite runs it)
"""

import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tyro
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@dataclass
class Args:
    output_dir: str = str(HERE / "work")
    """where data, checkpoints and per-stage logs go (large; git-ignored)"""
    results_dir: str = str(HERE)
    """where results.md, results.json and gold_vs_kl.png are written"""
    quick: bool = False
    """tiny sizes and one seed: checks that every stage connects and loads (used by the test suite)"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """one full pipeline per seed (data, SFT, RM, PPO, DPO, DPO-Iter, ablations)"""
    jobs: int = 2
    """seeds run side by side, one CPU thread each"""
    min_digits: int = 4
    """shortest digit string to sort"""
    max_digits: int = 10
    """longest digit string to sort"""
    num_sft: int = 2000
    """demonstrations for SFT"""
    num_pairs: int = 2000
    """preference pairs (train); 10% more are held out for the reward model's eval accuracy"""
    num_eval_prompts: int = 200
    """held-out prompts every policy is scored on"""
    bt_temperature: float = 0.1
    """Bradley-Terry label noise: P(a preferred) = sigmoid((gold(a) - gold(b)) / bt_temperature)"""
    sft_steps: int = 150
    """SFT optimizer steps (kept short on purpose: the SFT policy should be imperfect)"""
    rm_steps: int = 300
    """reward model optimizer steps"""
    dpo_epochs: float = 2.0
    """DPO epochs over the pairs (paper A.1: two epochs)"""
    ppo_episodes: int = 4096
    """PPO rollouts per run (the same for every ablation, so small batches mean more updates)"""
    large_batch: int = 64
    """rollouts per PPO iteration with the large-batch factor on"""
    small_batch: int = 16
    """rollouts per PPO iteration in the small-batch baseline"""
    dpo_iter_iterations: int = 3
    """DPO-Iter rounds"""


# ---- the task and its gold reward ----


def make_prompt(rng: random.Random, lo: int, hi: int) -> str:
    return "sort " + " ".join(str(rng.randrange(10)) for _ in range(rng.randint(lo, hi))) + " ="


def target(prompt: str) -> list:
    return sorted(re.findall(r"\d", prompt))


def gold_reward(prompt: str, completion: str) -> float:
    """Partial credit per correct position, minus one per missing or extra digit, over the length."""
    want, got = target(prompt), re.findall(r"\d", completion)
    hits = sum(a == b for a, b in zip(want, got))
    return (hits - abs(len(got) - len(want))) / len(want)


def gold_reward_fn(prompts: list, completions: list) -> list:
    """The `--reward_fn` form (prompts, completions) -> scores, for the scripts that take one."""
    return [gold_reward(p, c) for p, c in zip(prompts, completions)]


def corrupt(answer: list, rng: random.Random) -> list:
    """The behaviour policy of the preference data: the right answer with 0-3 random edits."""
    out = list(answer)
    for _ in range(rng.choice([0, 1, 1, 2, 2, 3])):
        kind, i = rng.randrange(4), rng.randrange(len(out))
        if kind == 0 and len(out) > 1:  # swap two neighbours
            j = min(i + 1, len(out) - 1)
            out[i], out[j] = out[j], out[i]
        elif kind == 1:  # replace a digit
            out[i] = str(rng.randrange(10))
        elif kind == 2 and len(out) > 1:  # drop a digit
            out.pop(i)
        else:  # duplicate a digit
            out.insert(i, out[i])
    return out


def write_jsonl(path: Path, rows: list):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_data(d: Path, args: Args, seed: int):
    rng = random.Random(seed)
    p = lambda: make_prompt(rng, args.min_digits, args.max_digits)  # noqa: E731
    write_jsonl(d / "sft.jsonl", [{"prompt": q, "completion": " " + " ".join(target(q))}
                                  for q in (p() for _ in range(args.num_sft))])
    pairs = []
    while len(pairs) < args.num_pairs * 1.1:
        q = p()
        a, b = corrupt(target(q), rng), corrupt(target(q), rng)
        if a == b:
            continue
        ga, gb = gold_reward(q, " ".join(a)), gold_reward(q, " ".join(b))
        a_wins = rng.random() < 1 / (1 + math.exp(-(ga - gb) / args.bt_temperature))
        win, lose = (a, b) if a_wins else (b, a)
        pairs.append({"prompt": q, "chosen": " " + " ".join(win), "rejected": " " + " ".join(lose)})
    write_jsonl(d / "pairs.jsonl", pairs)  # the first num_pairs train, the rest are held out
    write_jsonl(d / "eval_prompts.jsonl", [{"prompt": p()} for _ in range(args.num_eval_prompts)])


def make_base_model(d: Path, seed: int) -> str:
    """A word-level tokenizer over the task's vocabulary and a ~1M-parameter Llama config (untrained)."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", "sort", "="] + [str(i) for i in range(10)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(d / "base")
    tokenizer.save_pretrained(d / "base")
    return str(d / "base")


# ---- running the real scripts ----


def run_stage(name: str, script: str, d: Path, *args) -> float:
    """Run one stage as a subprocess (its log in d/logs/name.log); skip it if its output exists."""
    out = d / name
    if (out / "config.json").exists():
        return 0.0
    (d / "logs").mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / script), "--output_dir", str(out), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    start = time.time()
    with open(d / "logs" / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"stage {name} failed; see {d / 'logs' / (name + '.log')}\n{' '.join(cmd)}")
    return time.time() - start


# ---- evaluation with the gold reward ----


def left_pad(seqs: list, value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([[value] * (width - len(s)) + s for s in seqs])


@torch.no_grad()
def response_logps(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """Summed log-probability of each response (tokens after prompt_width, up to the mask's end)."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids).logits[:, :-1].float()
    logps = logits.gather(-1, sequences[:, 1:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    mask = attention_mask[:, 1:].clone()
    mask[:, : prompt_width - 1] = 0
    return (logps * mask).sum(-1)


@torch.no_grad()
def evaluate(policy_dir: str, sft_dir: str, rm_dir: str, prompts: list, seed: int, max_new_tokens: int = 12) -> dict:
    """Gold reward of greedy and of sampled (temperature 1) responses; reward-model score and KL(policy || SFT)
    (a Monte-Carlo estimate: the mean over samples of log pi(y|x) - log pi_sft(y|x)) of the sampled ones."""
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    sft = AutoModelForCausalLM.from_pretrained(sft_dir).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1).eval()
    out = {"gold_greedy": [], "gold_sampled": [], "rm_score": [], "kl": [], "length": []}
    for i in range(0, len(prompts), 64):
        chunk = prompts[i: i + 64]
        ids = left_pad([tok(p).input_ids for p in chunk], tok.pad_token_id)
        mask = (ids != tok.pad_token_id).long()  # this tokenizer's pad is distinct from every real token
        width = ids.shape[1]
        for mode in ("greedy", "sampled"):
            sampling = dict(do_sample=True, temperature=1.0, top_k=0) if mode == "sampled" else dict(do_sample=False)
            gen = policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, **sampling,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            responses = gen[:, width:]
            # everything after the first EOS is padding; the EOS itself belongs to the response
            after_eos = (responses == tok.eos_token_id).long().cumsum(-1) - (responses == tok.eos_token_id).long() > 0
            resp_mask = (~after_eos).long() * (responses != tok.pad_token_id).long()
            texts = tok.batch_decode(responses * resp_mask + tok.pad_token_id * (1 - resp_mask), skip_special_tokens=True)
            out[f"gold_{mode}"] += [gold_reward(p, t) for p, t in zip(chunk, texts)]
            if mode == "sampled":
                seq, full_mask = torch.cat([ids, responses], 1), torch.cat([mask, resp_mask], 1)
                kl = response_logps(policy, seq, full_mask, width) - response_logps(sft, seq, full_mask, width)
                out["kl"] += kl.tolist()
                out["length"] += resp_mask.sum(-1).tolist()
                hidden = rm(input_ids=seq, attention_mask=full_mask, output_hidden_states=True,
                            position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).hidden_states[-1]
                last = (torch.arange(seq.shape[1]) * full_mask).argmax(-1)
                out["rm_score"] += rm.score(hidden).squeeze(-1)[torch.arange(len(seq)), last].tolist()
    return {k: statistics.fmean(v) for k, v in out.items()}


# ---- the study ----

POLICIES = ["untrained", "sft", "dpo", "dpo_iter", "ppo_baseline", "ppo_adv_norm", "ppo_large_batch", "ppo"]
LABELS = {"untrained": "untrained model", "sft": "SFT", "dpo": "DPO", "dpo_iter": "DPO-Iter",
          "ppo_baseline": "baseline PPO (small batch)", "ppo_adv_norm": "+ Adv. Norm.",
          "ppo_large_batch": "+ Large Batch", "ppo": "+ Ref. EMA (= PPO)"}


def run_seed(args: Args, seed: int) -> dict:
    d = Path(args.output_dir) / f"seed_{seed}"
    make_data(d, args, seed)
    base = make_base_model(d, seed)
    seconds = {}
    common = ["--seed", seed, "--save_steps", 0, "--logging_steps", 10]
    seconds["sft"] = run_stage("sft", "sft.py", d, *common, "--model_name_or_path", base, "--init_from_scratch",
                               "--dataset_name", d / "sft.jsonl", "--max_steps", args.sft_steps,
                               "--per_device_train_batch_size", 32, "--learning_rate", 1e-3, "--warmup_ratio", 0.05)
    sft = str(d / "sft")
    train = f"train[:{args.num_pairs}]"
    seconds["reward_model"] = run_stage(
        "reward_model", "reward_model.py", d, *common, "--model_name_or_path", sft, "--dataset_name", d / "pairs.jsonl",
        "--train_split", train, "--eval_split", f"train[{args.num_pairs}:]", "--max_steps", args.rm_steps,
        "--per_device_train_batch_size", 32, "--learning_rate", 3e-4, "--eval_steps", args.rm_steps)
    rm = str(d / "reward_model")
    seconds["dpo"] = run_stage("dpo", "dpo.py", d, *common, "--model_name_or_path", sft, "--dataset_name", d / "pairs.jsonl",
                               "--train_split", train, "--num_train_epochs", args.dpo_epochs, "--beta", 0.1,
                               "--per_device_train_batch_size", 32, "--learning_rate", 1e-4, "--eval_steps", 10 ** 6)
    seconds["dpo_iter"] = run_stage(
        "dpo_iter", "dpo.py", d, *common, "--model_name_or_path", sft, "--dataset_name", d / "pairs.jsonl", "--train_split", train,
        "--iterations", args.dpo_iter_iterations, "--reward_model_name_or_path", rm, "--samples_per_prompt", 4,
        "--max_new_tokens", 12, "--num_train_epochs", 1, "--beta", 0.1, "--per_device_train_batch_size", 32,
        "--learning_rate", 1e-4, "--eval_steps", 10 ** 6)
    # Table 3, cumulatively: baseline -> + advantage normalization -> + large batch -> + reference EMA.
    ppo = ["--model_name_or_path", sft, "--reward_model_name_or_path", rm, "--dataset_name", d / "pairs.jsonl", "--train_split",
           train, "--max_new_tokens", 12, "--total_episodes", args.ppo_episodes, "--learning_rate", 3e-5,
           "--critic_learning_rate", 1e-4, "--kl_coef", 0.05, "--missing_eos_penalty", -1.0,
           "--per_device_train_batch_size", 4, "--eval_steps", 10 ** 6]
    variants = {"ppo_baseline": ["--no-whiten_advantages", "--ref_ema", 0, "--per_device_prompt_batch_size", args.small_batch],
                "ppo_adv_norm": ["--ref_ema", 0, "--per_device_prompt_batch_size", args.small_batch],
                "ppo_large_batch": ["--ref_ema", 0, "--per_device_prompt_batch_size", args.large_batch],
                "ppo": ["--per_device_prompt_batch_size", args.large_batch]}
    for name, extra in variants.items():
        seconds[name] = run_stage(name, "ppo.py", d, *common, *ppo, *extra)

    prompts = [json.loads(line)["prompt"] for line in open(d / "eval_prompts.jsonl")]
    rm_metrics = [json.loads(line) for line in open(d / "reward_model" / "metrics.jsonl")]
    results = {"seed": seed, "seconds": seconds,
               "rm_eval_accuracy": [m["eval/accuracy"] for m in rm_metrics if "eval/accuracy" in m][-1]}
    for name in POLICIES:
        path = base if name == "untrained" else str(d / name)
        results[name] = evaluate(path, sft, rm, prompts, seed)
    (d / "results.json").write_text(json.dumps(results, indent=2))
    return results


def mean_std(values: list) -> str:
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def write_report(args: Args, runs: list, wall: float):
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(runs, indent=2))
    lines = [f"# Tiny pipeline results ({'quick' if args.quick else 'full'} mode)", "",
             f"Digit sorting, gold reward in [-1, 1] (1 = perfect). Seeds {args.seeds}; mean ± std over seeds; "
             f"{args.num_eval_prompts} held-out prompts per seed. KL = mean over sampled responses of "
             "log pi(y|x) - log pi_SFT(y|x). Reward-model held-out accuracy: "
             f"{mean_std([r['rm_eval_accuracy'] for r in runs])}. Wall time {wall / 60:.1f} min.", "",
             "| policy | gold reward (greedy) | gold reward (sampled) | KL to SFT | reward-model score |",
             "| --- | --- | --- | --- | --- |"]
    for name in POLICIES:
        cells = [mean_std([r[name][k] for r in runs]) for k in ("gold_greedy", "gold_sampled", "kl", "rm_score")]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in POLICIES[1:]:
        xs, ys = [r[name]["kl"] for r in runs], [r[name]["gold_sampled"] for r in runs]
        ax.scatter(xs, ys, label=LABELS[name], s=30)
    ax.set_xlabel("KL(policy || SFT), nats per response")
    ax.set_ylabel("gold reward (sampled)")
    ax.set_title("Gold reward against KL, one point per seed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "gold_vs_kl.png", dpi=120)


def main(args: Args):
    if args.quick:
        args.seeds, args.num_sft, args.num_pairs, args.num_eval_prompts = args.seeds[:1], 256, 256, 32
        args.sft_steps, args.rm_steps, args.dpo_epochs, args.ppo_episodes = 20, 10, 1.0, 64
        args.large_batch, args.small_batch, args.dpo_iter_iterations = 32, 16, 2
    start = time.time()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        runs = list(pool.map(lambda s: run_seed(args, s), args.seeds))
    write_report(args, runs, time.time() - start)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(tyro.cli(Args))
