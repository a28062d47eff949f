"""PPO for language models: the RL stage of RLHF, with the key factors of Xu et al. 2024 (Sec. 5).

The policy (initialized from an SFT model) samples responses to prompts; a frozen reward model (or a
reward function) scores each response; PPO maximizes that score minus a KL penalty to a reference
policy (paper Eq. 1-2). Following Tulu 2.5 (Ivison et al. 2024, App. F) the problem is a token-level
MDP: the clipped scalar score sits on the last response token, every response token pays
`-kl_coef * (log pi - log pi_ref)` (Tulu 2.5 Eq. 4), and a critic initialized from the reward model
predicts a value at every response token for GAE.

The three factors Xu et al. found decisive (Sec. 5, Table 3) are on by default and each has a switch:
  advantage normalization   --whiten_advantages / --no-whiten_advantages
  large batch               512 rollouts per iteration in 4 minibatches (the batch-size arguments)
  reference-model EMA       --ref_ema 0.01 (0 turns it off)

    python ppo.py --model_name_or_path SFT_DIR --reward_model_name_or_path RM_DIR --dataset_name PROMPTS
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml ppo.py ...

One iteration = rollout (generate, score, log-probs, values, rewards, GAE) then `ppo_epochs` passes of
clipped-PPO updates over the rollout batch in `num_minibatches` minibatches, then the reference EMA.

Self-contained on purpose: the small helpers below are repeated, byte-identical, in every script.
"""

import contextlib
import importlib.util
import json
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import tyro
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, set_seed
from datasets import Dataset, load_dataset
from tqdm.auto import tqdm
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig,
                          get_scheduler)


@dataclass
class Args:
    # ---- models ----
    model_name_or_path: str = "EleutherAI/pythia-160m"
    """the SFT policy to start from (hub id or local directory); the reference policy is a frozen copy"""
    tokenizer_name_or_path: Optional[str] = None
    """tokenizer of the policy (defaults to model_name_or_path)"""
    reward_model_name_or_path: Optional[str] = None
    """a reward_model.py checkpoint (AutoModelForSequenceClassification, num_labels=1) scoring responses"""
    reward_fn: Optional[str] = None
    """instead of a reward model: 'path/to/file.py:function', (prompts, completions) -> list of floats"""
    value_model_name_or_path: Optional[str] = None
    """critic initialization (default: the reward model, Tulu 2.5 App. F; with --reward_fn and no reward
    model: the policy checkpoint with a fresh scalar head)"""
    normalize_reward: bool = False
    """standardize scores with the reward_mean / reward_std stored in the reward model's config"""
    trust_remote_code: bool = False
    """allow model/tokenizer code from the hub to run (opt-in)"""
    # ---- prompts ----
    dataset_name: str = "Anthropic/hh-rlhf"
    """prompts: a 'prompt' column, or any preference / SFT dataset (its prompts are used); hub id or local file"""
    dataset_config: Optional[str] = None
    """hub dataset configuration name"""
    train_split: str = "train"
    """split whose prompts drive the rollouts"""
    eval_split: Optional[str] = None
    """held-out prompts for eval/score, eval/kl and best-checkpoint selection (None: no evaluation)"""
    filter: Literal["none", "dual_safe", "dual_unsafe"] = "none"
    """SafeRLHF-style data: drop pairs where both responses are safe / both unsafe (paper Table 2)"""
    max_prompt_length: int = 512
    """prompts longer than this keep their last tokens"""
    # ---- rollout (paper App. A.2: temperature 1.0, top-k 200, 256 new tokens on HH-RLHF) ----
    max_new_tokens: int = 256
    """maximum response length; generation stops at EOS"""
    temperature: float = 1.0
    """sampling temperature (log-probabilities are computed at the same temperature)"""
    top_k: int = 200
    """sample from the k most likely tokens (0: no top-k)"""
    top_p: float = 1.0
    """nucleus sampling threshold (1.0: off)"""
    samples_per_prompt: int = 1
    """responses sampled per prompt (Tulu 2.5 App. G: several rollouts per prompt)"""
    local_rollout_forward_batch_size: int = 16
    """sequences per generate / no-grad forward chunk during rollout, per device"""
    # ---- batch sizes (paper App. A.2: 512 rollouts per iteration split into 4 minibatches) ----
    per_device_prompt_batch_size: int = 64
    """prompts per device per iteration; rollout batch = this x samples_per_prompt x processes"""
    num_minibatches: int = 4
    """the rollout batch is split into this many minibatches, one optimizer step each"""
    per_device_train_batch_size: int = 4
    """sequences per device per forward/backward micro-batch (gradient accumulation fills a minibatch)"""
    ppo_epochs: int = 1
    """passes over each rollout batch (Tulu 2.5 App. G: more than one destabilizes)"""
    num_iterations: int = -1
    """rollout+update iterations; overrides total_episodes and num_train_epochs when > 0"""
    total_episodes: int = -1
    """number of rollouts (responses) to train on; overrides num_train_epochs when > 0"""
    num_train_epochs: float = 1.0
    """passes over the prompts (paper: 5 on HH-RLHF)"""
    # ---- PPO ----
    learning_rate: float = 1e-5
    """actor (policy) learning rate (paper App. A.2)"""
    critic_learning_rate: float = 5e-6
    """critic (value model) learning rate (paper App. A.2)"""
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """learning-rate schedule after warmup (same shape for actor and critic)"""
    warmup_ratio: float = 0.0
    """fraction of optimizer steps spent warming up linearly"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm (actor and critic each; under DeepSpeed, the config's joint gradient_clipping)"""
    gamma: float = 1.0
    """discount factor (paper App. A.2)"""
    lam: float = 1.0
    """GAE lambda (paper App. A.2)"""
    clip_range: float = 0.2
    """PPO ratio clipping epsilon"""
    clip_range_value: float = 0.2
    """value clipping range around the rollout values (in normalized units when normalize_value)"""
    vf_coef: float = 0.1
    """value loss coefficient (Tulu 2.5 Table 9)"""
    kl_coef: float = 0.1
    """KL penalty coefficient beta (paper App. A.2); the initial value when kl_target is set"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token KL: k1 = log pi - log pi_ref; k3 = (r - 1) - log r with r = pi_ref / pi (non-negative)"""
    kl_target: Optional[float] = None
    """adaptive KL controller target (sequence KL, nats); None: fixed kl_coef (paper, Tulu 2.5)"""
    kl_horizon: int = 10000
    """adaptive KL controller horizon (episodes)"""
    reward_clip: float = 20.0
    """scores are clipped to +-reward_clip (paper App. A.2)"""
    missing_eos_penalty: Optional[float] = None
    """EOS trick (Tulu 2.5 App. F): a response without EOS gets this score, e.g. -10.0 (None: off)"""
    whiten_advantages: bool = True
    """key factor 1 (Sec. 5): whiten advantages over the rollout batch (masked)"""
    normalize_value: bool = True
    """value normalization (App. A.2): the critic learns returns standardized by running statistics"""
    ref_ema: float = 0.01
    """key factor 3 (Sec. 5): after each iteration ref <- (1 - ref_ema) ref + ref_ema policy; 0 turns it
    off. The paper gives no rate; 0.01 is our documented choice"""
    # ---- run ----
    seed: int = 1
    """random seed (sampling, data order)"""
    bf16: bool = False
    """bfloat16 mixed precision; the frozen reference and reward models are loaded in bfloat16"""
    gradient_checkpointing: bool = False
    """trade compute for memory in the policy and critic"""
    output_dir: str = "outputs/ppo"
    """where the policy, args.json, metrics.jsonl, samples.jsonl, best/ and checkpoints/ go"""
    logging_steps: int = 1
    """log metrics every this many iterations"""
    eval_steps: int = 10
    """evaluate on eval_split every this many iterations (and at the end)"""
    per_device_eval_batch_size: int = 16
    """eval prompts per generate chunk, per device"""
    save_steps: int = 0
    """write a resumable checkpoint every this many iterations (0: never)"""
    resume_from_checkpoint: Optional[str] = None
    """'latest' or a path to output_dir/checkpoints/step_N to continue from"""
    num_samples: int = 4
    """eval prompts whose responses are written to samples.jsonl at each eval"""
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    """experiment tracker"""


class DataError(ValueError):
    """Bad input: reported as one line, before any model is loaded."""


# ---------------------------------------------------------------------------------------------
# ---- shared helpers (byte-identical in sft.py, reward_model.py, dpo.py, ppo.py) ----
# ---------------------------------------------------------------------------------------------


def load_split(name: str, config: Optional[str], split: str) -> Dataset:
    """A hub dataset, or local .json/.jsonl/.parquet file(s); a directory's files are named by split."""
    path = Path(name)
    if path.suffix in (".json", ".jsonl", ".parquet") or path.exists():
        if not path.exists():
            raise DataError(f"{name}: no such file")
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl", ".parquet")) if path.is_dir() else [path]
        if not files or all(f.stat().st_size == 0 for f in files):
            raise DataError(f"{name}: no data (empty file or no .json/.jsonl/.parquet files)")
        data_files = {f.stem: str(f) for f in files} if path.is_dir() else {"train": str(path)}
        builder = "parquet" if files[0].suffix == ".parquet" else "json"
        try:
            ds = load_dataset(builder, data_files=data_files, split=split)
        except ValueError as e:  # unknown split, unreadable file
            raise DataError(f"{name}: cannot load split '{split}' ({e})") from None
    else:
        ds = load_dataset(name, config, split=split)
    if len(ds) == 0:
        raise DataError(f"{name} split '{split}' is empty")
    return ds


def split_hh_transcript(chosen: str, rejected: str):
    """HH-RLHF: the prompt is the shared text up to and including the last '\\n\\nAssistant:'."""
    marker = "\n\nAssistant:"
    cut = chosen.rfind(marker)
    if cut < 0:
        raise DataError(f"HH-RLHF transcript without '{marker.strip()}': {chosen[:60]!r}")
    prompt = chosen[: cut + len(marker)]
    if not rejected.startswith(prompt):
        raise DataError(f"HH-RLHF pair whose transcripts diverge before the last turn: {prompt[:60]!r}")
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def to_preference(ds: Dataset, filter: str = "none") -> Dataset:
    """Any preference shape of DESIGN section 4 -> columns prompt, chosen, rejected."""
    cols = set(ds.column_names)
    if {"response_0", "response_1", "better_response_id", "safer_response_id"} <= cols:
        # Paper Sec. 4.3: prefer the safer response when safety differs, else the more helpful one.
        def saferlhf(row):
            safe = (row["is_response_0_safe"], row["is_response_1_safe"])
            win = row["safer_response_id"] if safe[0] != safe[1] else row["better_response_id"]
            return {"prompt": row["prompt"], "chosen": row[f"response_{win}"], "rejected": row[f"response_{1 - win}"]}

        keep = {"none": lambda r: True,
                "dual_safe": lambda r: not (r["is_response_0_safe"] and r["is_response_1_safe"]),
                "dual_unsafe": lambda r: r["is_response_0_safe"] or r["is_response_1_safe"]}[filter]
        n = len(ds)
        ds = ds.filter(keep)
        print(f"SafeRLHF construction: kept {len(ds)} of {n} pairs (filter={filter})")
        ds = ds.map(saferlhf, remove_columns=ds.column_names)
    elif {"prompt", "chosen", "rejected"} <= cols:
        ds = ds.select_columns(["prompt", "chosen", "rejected"])
    elif {"chosen", "rejected"} <= cols:
        def hh(row):
            prompt, chosen, rejected = split_hh_transcript(row["chosen"], row["rejected"])
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

        ds = ds.map(hh, remove_columns=ds.column_names)
    else:
        raise DataError(f"dataset has columns {sorted(cols)}; expected one of: prompt+chosen+rejected, "
                        "chosen+rejected (HH-RLHF), prompt+response_0+response_1+better_response_id+safer_response_id")
    if len(ds) == 0:
        raise DataError("no preference pairs left after filtering")
    return ds


def render_chat(tokenizer, messages, add_generation_prompt=False) -> str:
    if tokenizer.chat_template is None:
        raise DataError("conversational data needs a tokenizer with a chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_prompt(tokenizer, prompt) -> list:
    """Prompt token ids: a string as is (with the tokenizer's special tokens), messages via the chat template."""
    if isinstance(prompt, list):
        return tokenizer(render_chat(tokenizer, prompt, add_generation_prompt=True), add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids


def encode_completion(tokenizer, prompt, completion) -> list:
    """Completion token ids, ending in EOS so the model learns to stop (needed by the EOS trick)."""
    if isinstance(completion, list):  # assistant messages: the text the template adds after the prompt
        before = render_chat(tokenizer, prompt, add_generation_prompt=True)
        after = render_chat(tokenizer, prompt + completion)
        if not after.startswith(before):
            raise DataError("chat template renders the prompt differently once a response follows")
        completion = after[len(before):]
    ids = tokenizer(completion, add_special_tokens=False).input_ids
    return ids if ids and ids[-1] == tokenizer.eos_token_id else ids + [tokenizer.eos_token_id]


def truncate(prompt_ids: list, completion_ids: list, max_length: int, max_prompt_length: Optional[int]):
    """Prompts keep their end, completions their start. Returns (prompt, completion, truncated) or None
    when the prompt leaves no room for a completion (the caller drops and counts it)."""
    truncated = False
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids, truncated = prompt_ids[-max_prompt_length:], True
    if len(prompt_ids) >= max_length:
        return None
    if len(prompt_ids) + len(completion_ids) > max_length:
        completion_ids, truncated = completion_ids[: max_length - len(prompt_ids)], True
    return prompt_ids, completion_ids, truncated


def pad(seqs: list, value, side: str = "right") -> torch.Tensor:
    width = max(len(s) for s in seqs)
    rows = [[value] * (width - len(s)) + list(s) if side == "left" else list(s) + [value] * (width - len(s)) for s in seqs]
    return torch.tensor(rows)


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so left padding does not shift absolute position embeddings."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] without materializing the full log-softmax (logit - logsumexp)."""
    logits = logits.float()
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def load_tokenizer(args):
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path or args.model_name_or_path,
                                              trust_remote_code=args.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; completions must end in EOS")
    if tokenizer.pad_token_id is None:
        # Sequence ends are found from the attention mask, never from pad ids, so EOS-as-pad is safe.
        print("tokenizer has no pad token: using EOS as pad (ends are found from the attention mask)")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class MetricsLog:
    """metrics.jsonl: one JSON object per logging step, written by the main process, flushed as written."""

    def __init__(self, accelerator, output_dir):
        self.accelerator = accelerator
        self.file = open(Path(output_dir) / "metrics.jsonl", "a") if accelerator.is_main_process else None

    def log(self, metrics: dict, step: int):
        metrics = {k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}
        self.accelerator.log(metrics, step=step)
        if self.file:
            self.file.write(json.dumps({"step": step, **metrics}) + "\n")
            self.file.flush()


def write_args(args, output_dir):
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(output_dir) / "args.json", "w") as f:
        json.dump(asdict(args), f, indent=2)


def save_model(accelerator, model, tokenizer, output_dir):
    """Loadable with plain from_pretrained; the state dict is gathered first (ZeRO-3 safe)."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(output_dir, state_dict=state_dict)
        tokenizer.save_pretrained(output_dir)
    accelerator.wait_for_everyone()


def save_checkpoint(accelerator, output_dir, step: int):
    """output_dir/checkpoints/step_N, written under a temporary name and renamed when complete, so a
    run killed while saving never leaves a half-written checkpoint that 'latest' would pick."""
    final = Path(output_dir) / "checkpoints" / f"step_{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "step.json").write_text(json.dumps({"step": step}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    accelerator.wait_for_everyone()


def find_checkpoint(output_dir, resume_from_checkpoint: Optional[str]) -> Optional[Path]:
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint != "latest":
        path = Path(resume_from_checkpoint)
        if not (path / "step.json").exists():
            raise DataError(f"{path}: not a complete checkpoint (no step.json)")
        return path
    done = [p for p in (Path(output_dir) / "checkpoints").glob("step_*") if (p / "step.json").exists()]
    return max(done, key=lambda p: int(p.name.split("_")[1])) if done else None


# ---- contract helpers (byte-identical in reward_model.py, dpo.py, ppo.py) ----


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, from the attention mask (left or right padding, pad == EOS)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask).argmax(-1)


def score_tokens(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head of an AutoModelForSequenceClassification (num_labels=1) at every token: [B, T].
    HF's own pooling finds the last token from pad_token_id, which breaks when pad == EOS, so we apply
    the head to the final hidden states ourselves; callers pick positions from the attention mask."""
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from(attention_mask), output_hidden_states=True)
    return getattr(model, "module", model).score(out.hidden_states[-1]).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# ---- PPO math (pure functions; tests compare them with hand-written loops) ----
# ---------------------------------------------------------------------------------------------
# Shapes: [B, T] over response tokens; `mask` is 1 on the response up to and including the first EOS
# (a prefix of each row), 0 after it. `reduce`, when given, sums a tensor over processes, so batch
# statistics are those of the global rollout batch (accelerator.reduce(t, "sum")).


def masked_mean(x: torch.Tensor, mask: torch.Tensor, reduce=None) -> torch.Tensor:
    total = torch.stack([(x * mask).sum(), mask.sum().to(x.dtype)])
    if reduce is not None:
        total = reduce(total)
    return total[0] / total[1].clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, reduce=None) -> torch.Tensor:
    """Population variance of the masked entries."""
    mean = masked_mean(x, mask, reduce)
    return masked_mean((x - mean) ** 2, mask, reduce)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce=None) -> torch.Tensor:
    """(x - mean) / std over the masked entries; shift_mean=False keeps the mean. Masked-out entries -> 0."""
    mean, var = masked_mean(x, mask, reduce), masked_var(x, mask, reduce)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def compute_gae(rewards, values, mask, gamma: float, lam: float):
    """Generalized advantage estimation (Schulman et al. 2016) over response tokens.
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}; the value after the last
    real token is 0 (the episode ends at EOS), so values after EOS are ignored. -> (advantages, returns)."""
    mask = mask.to(rewards.dtype)
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def compute_advantages(rewards, values, mask, gamma: float, lam: float, whiten: bool, reduce=None):
    """GAE advantages and returns; with `whiten` (key factor 1, Sec. 5) the advantages are whitened over the
    rollout batch, masked (Tulu 2.5 App. F: whiten advantages, not rewards). Returns are never whitened."""
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    if whiten:
        advantages = masked_whiten(advantages, mask, reduce=reduce)
    return advantages, returns


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from the sampled token. k1 = log pi - log pi_ref (unbiased,
    can be negative); k3 = (r - 1) - log r with r = pi_ref / pi (unbiased, never negative)."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        log_r = ref_logp - logp
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown kl estimator {estimator!r}")


def compute_rewards(scores, logp, ref_logp, mask, kl_coef: float, estimator: str = "k1",
                    reward_clip: Optional[float] = None):
    """Tulu 2.5 Eq. 4: r_t = -kl_coef * kl_t on every response token, plus the (clipped) score on the last
    real token. -> (rewards, kl, non_score_reward), all [B, T] and zero outside the mask."""
    mask = mask.to(logp.dtype)
    kl = kl_penalty(logp, ref_logp, estimator) * mask
    non_score_reward = -kl_coef * kl
    if reward_clip is not None:
        scores = scores.clamp(-reward_clip, reward_clip)
    rewards = non_score_reward.clone()
    rewards[torch.arange(len(rewards), device=rewards.device), last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards, kl, non_score_reward


def policy_loss(new_logp, old_logp, advantages, mask, clip_range: float, n_tokens=None):
    """Clipped surrogate: mean over tokens of max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)). The sum is
    divided by n_tokens when given (the token count of the global minibatch), else by mask.sum().
    -> (loss, {clipfrac, approxkl})."""
    mask = mask.to(new_logp.dtype)
    ratio = torch.exp(new_logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.max(unclipped, clipped)
    loss = (per_token * mask).sum() / (mask.sum().clamp(min=1) if n_tokens is None else n_tokens)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).to(mask.dtype), mask),
                 "approxkl": 0.5 * masked_mean((new_logp - old_logp) ** 2, mask)}
    return loss, stats


def value_loss(new_values, old_values, returns, mask, clip_range_value: float, n_tokens=None):
    """Clipped value loss: 0.5 * mean of max((V - G)^2, (V_clipped - G)^2) with V_clipped kept within
    +-clip_range_value of the rollout values. -> (loss, {clipfrac})."""
    mask = mask.to(new_values.dtype)
    clipped_values = old_values + (new_values - old_values).clamp(-clip_range_value, clip_range_value)
    unclipped_sq, clipped_sq = (new_values - returns) ** 2, (clipped_values - returns) ** 2
    per_token = 0.5 * torch.max(unclipped_sq, clipped_sq)
    loss = (per_token * mask).sum() / (mask.sum().clamp(min=1) if n_tokens is None else n_tokens)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped_sq > unclipped_sq).to(mask.dtype), mask)}
    return loss, stats


def truncate_after_eos(responses: torch.Tensor, eos_id: int, pad_id: int):
    """Keep each response up to and including its first EOS; replace what follows with pad.
    -> (responses, mask [B, T] long, has_eos [B] bool). A response without EOS keeps all its tokens."""
    is_eos = responses == eos_id
    has_eos = is_eos.any(-1)
    T = responses.shape[1]
    end = torch.where(has_eos, is_eos.long().argmax(-1), torch.full_like(has_eos, T - 1, dtype=torch.long))
    mask = torch.arange(T, device=responses.device)[None, :] <= end[:, None]
    return responses.masked_fill(~mask, pad_id), mask.long(), has_eos


def apply_missing_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: Optional[float]) -> torch.Tensor:
    """Tulu 2.5 App. F, the EOS trick: a truncated response (no EOS) gets `penalty` as its score."""
    if penalty is None:
        return scores
    return torch.where(has_eos, scores, torch.full_like(scores, penalty))


class RunningMeanStd:
    """Running mean and variance of the returns (paper App. A.2 value normalization): the critic learns
    (G - mean) / std and its outputs are mapped back with V * std + mean before GAE. Batches are merged
    with Chan et al.'s parallel formula, so the statistics equal those of all returns seen so far."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0.0

    def update(self, x: torch.Tensor, mask: torch.Tensor, reduce=None):
        mask = mask.to(x.dtype)
        total = torch.stack([(x * mask).sum(), mask.sum()])
        total = reduce(total) if reduce is not None else total
        n = total[1].item()
        if n == 0:
            return
        batch_mean = total[0].item() / n
        batch_var = masked_mean((x - batch_mean) ** 2, mask, reduce).item()
        delta, new_count = batch_mean - self.mean, self.count + n
        m2 = self.var * self.count + batch_var * n + delta ** 2 * self.count * n / new_count
        self.mean, self.var, self.count = self.mean + delta * n / new_count, m2 / new_count, new_count

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-8))

    def state_dict(self):
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state):
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


class AdaptiveKLController:
    """Ziegler et al. 2019: move kl_coef so the sequence KL tracks `target` (off by default, like the paper)."""

    def __init__(self, kl_coef: float, target: Optional[float], horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, n_episodes: int):
        if self.target is not None:
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_episodes / self.horizon

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


@torch.no_grad()
def ema_update(ref_model: torch.nn.Module, policy_model: torch.nn.Module, ref_ema: float):
    """Sec. 5 reference-model EMA: ref <- (1 - ref_ema) * ref + ref_ema * policy. ref_ema = 0: untouched."""
    if ref_ema == 0:
        return
    ref_params, policy_params = dict(ref_model.named_parameters()), dict(policy_model.named_parameters())
    if ref_params.keys() != policy_params.keys():
        raise ValueError("reference and policy have different parameters")
    for name, p_ref in ref_params.items():
        p_ref.lerp_(policy_params[name].detach().to(p_ref.dtype), ref_ema)


def derive_batch_sizes(args, num_processes: int) -> dict:
    """CleanRL-style derived sizes. One iteration samples `rollout_batch_size` responses, then each PPO
    epoch takes num_minibatches optimizer steps, each over `minibatch_size` responses made of
    gradient_accumulation_steps micro-batches of per_device_train_batch_size per device."""
    local_rollout = args.per_device_prompt_batch_size * args.samples_per_prompt
    sizes = {
        "local_rollout_batch_size": local_rollout,  # responses per device per iteration
        "rollout_batch_size": local_rollout * num_processes,  # responses per iteration (paper: 512)
        "prompts_per_iteration": args.per_device_prompt_batch_size * num_processes,
        "local_minibatch_size": local_rollout // max(args.num_minibatches, 1),
        "minibatch_size": local_rollout * num_processes // max(args.num_minibatches, 1),  # paper: 128
        "gradient_accumulation_steps":
            local_rollout // max(args.num_minibatches, 1) // max(args.per_device_train_batch_size, 1),
        "optimizer_steps_per_iteration": args.ppo_epochs * args.num_minibatches,
    }
    if min(args.per_device_prompt_batch_size, args.samples_per_prompt, args.num_minibatches,
           args.per_device_train_batch_size, args.ppo_epochs, args.local_rollout_forward_batch_size) < 1:
        raise DataError("batch sizes, samples_per_prompt, num_minibatches and ppo_epochs must be >= 1")
    if local_rollout % args.num_minibatches or sizes["local_minibatch_size"] % args.per_device_train_batch_size:
        raise DataError(f"per-device rollout batch {local_rollout} (per_device_prompt_batch_size x samples_per_prompt) "
                        f"must split into num_minibatches={args.num_minibatches} minibatches of whole "
                        f"micro-batches of per_device_train_batch_size={args.per_device_train_batch_size}")
    return sizes


# ---------------------------------------------------------------------------------------------
# ---- prompts ----
# ---------------------------------------------------------------------------------------------


def to_prompts(ds: Dataset, filter: str = "none") -> list:
    """Prompts of any prompt source (DESIGN section 4): a 'prompt' column (string or messages), a
    conversation (everything before its last assistant turn), or any preference dataset's prompts."""
    cols = set(ds.column_names)
    if "prompt" in cols and not ({"response_0", "response_1"} <= cols and filter != "none"):
        return list(ds["prompt"])
    if "messages" in cols:
        prompts = []
        for messages in ds["messages"]:
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
            prompts.append(messages[:last])
        return prompts
    try:
        return list(to_preference(ds, filter)["prompt"])
    except DataError as e:
        if "expected one of" not in str(e):
            raise
        raise DataError(f"dataset has columns {sorted(cols)}; expected a prompt source: prompt, messages, "
                        "or a preference shape (prompt+chosen+rejected, chosen+rejected, SafeRLHF)") from None


def tokenize_prompts(prompts: list, tokenizer, max_prompt_length: int, name: str) -> list:
    """-> list of prompt token-id lists, keeping the end of long prompts; empty prompts are dropped."""
    out, n_truncated, n_dropped = [], 0, 0
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt) if prompt else []
        if not ids:
            n_dropped += 1
            continue
        if len(ids) > max_prompt_length:
            ids, n_truncated = ids[-max_prompt_length:], n_truncated + 1
        out.append(ids)
    print(f"{name}: {len(out)} prompts, {n_truncated} truncated to max_prompt_length={max_prompt_length}, "
          f"{n_dropped} empty dropped")
    if not out:
        raise DataError(f"{name}: no prompts (all {len(prompts)} are empty)")
    return out


def collate_prompts(prompts: list, pad_id: int) -> dict:
    """Left-padded, so every response starts at the same column and generation appends on the right."""
    return {"input_ids": pad(prompts, pad_id, "left"), "attention_mask": pad([[1] * len(p) for p in prompts], 0, "left")}


def load_reward_fn(spec: str):
    """'path/to/file.py:function' -> the function, loaded with importlib (user code: only what you trust)."""
    path, _, name = spec.rpartition(":")
    if not path or not Path(path).is_file():
        raise DataError(f"--reward_fn {spec!r}: expected 'path/to/file.py:function' with an existing file")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, name, None)):
        raise DataError(f"--reward_fn {spec!r}: {path} has no function {name!r}")
    return getattr(module, name)


def same_vocab(tokenizer_a, tokenizer_b) -> bool:
    return tokenizer_a.get_vocab() == tokenizer_b.get_vocab()


def retokenize(prompt_texts: list, completion_texts: list, has_eos: torch.Tensor, tokenizer) -> dict:
    """Text -> another model's tokens (a reward model with a different tokenizer): the prompt as
    encode_prompt does for strings, then the completion, with EOS only where the policy emitted one.
    Right-padded; the reward is read at the last real token."""
    seqs = []
    for prompt, completion, eos in zip(prompt_texts, completion_texts, has_eos.tolist()):
        ids = tokenizer(prompt).input_ids + tokenizer(completion, add_special_tokens=False).input_ids
        seqs.append(ids + [tokenizer.eos_token_id] if eos else ids)
    return {"input_ids": pad(seqs, tokenizer.pad_token_id), "attention_mask": pad([[1] * len(s) for s in seqs], 0)}


# ---------------------------------------------------------------------------------------------
# ---- models ----
# ---------------------------------------------------------------------------------------------


def disable_dropout(model: torch.nn.Module):
    """Dropout would make the rollout log-probs and the update's log-probs disagree (DESIGN section 5)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout", "attn_dropout"):  # functional dropout rates (Llama, Qwen2...)
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    disable_dropout(model)
    return model.eval().requires_grad_(False)


class PolicyAndValue(torch.nn.Module):
    """Actor and critic in one module with one AdamW holding two parameter groups (actor lr, critic lr).
    Why one module: accelerate prepares a single model per DeepSpeed engine, so one wrapper runs the same
    under DDP, ZeRO-2 and ZeRO-3 and needs one backward; the parameters stay separate (paper App. A.2),
    and the two parameter groups keep the paper's separate learning rates."""

    def __init__(self, policy, critic):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, input_ids, attention_mask):
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids_from(attention_mask)).logits
        return logits, score_tokens(self.critic, input_ids, attention_mask)


def response_logprobs(logits: torch.Tensor, responses: torch.Tensor, context_length: int, temperature: float):
    """Log-probabilities of the response tokens at the sampling temperature: logits at position t predict t+1."""
    return token_logprobs(logits[:, context_length - 1: -1] / temperature, responses)


def gathered_for_generation(accelerator, module):
    """ZeRO-3 shards the weights: gather them once for the whole rollout, not once per generated token."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:
        import deepspeed  # only needed (and only importable) under DeepSpeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()))
    return contextlib.nullcontext()


def save_policy(accelerator, model, tokenizer, output_dir):
    """The policy alone, loadable with plain AutoModelForCausalLM.from_pretrained (ZeRO-3 safe)."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        state_dict = {k[len("policy."):]: v for k, v in state_dict.items() if k.startswith("policy.")}
        accelerator.unwrap_model(model).policy.save_pretrained(output_dir, state_dict=state_dict)
        tokenizer.save_pretrained(output_dir)
    accelerator.wait_for_everyone()


def peak_memory_gb(device) -> float:
    if torch.cuda.is_available() and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: peak RSS (KiB on Linux)


# ---------------------------------------------------------------------------------------------
# ---- rollout ----
# ---------------------------------------------------------------------------------------------


class Scorer:
    """Score (prompt, response) pairs with the reward model or the reward function."""

    def __init__(self, args, tokenizer, device, reward_model=None, reward_tokenizer=None, reward_fn=None):
        self.args, self.tokenizer, self.device = args, tokenizer, device
        self.reward_model, self.reward_tokenizer, self.reward_fn = reward_model, reward_tokenizer, reward_fn
        config = reward_model.config if reward_model is not None else None
        self.mean = float(getattr(config, "reward_mean", 0.0)) if args.normalize_reward and config else 0.0
        self.std = float(getattr(config, "reward_std", 1.0)) if args.normalize_reward and config else 1.0

    def texts(self, prompts, prompt_mask, responses, response_mask):
        prompt_texts = [self.tokenizer.decode(p[m.bool()].tolist(), skip_special_tokens=True)
                        for p, m in zip(prompts, prompt_mask)]
        completions = [self.tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True)
                       for r, m in zip(responses, response_mask)]
        return prompt_texts, completions

    @torch.no_grad()
    def __call__(self, prompts, prompt_mask, responses, response_mask, has_eos) -> torch.Tensor:
        if self.reward_fn is not None:
            prompt_texts, completions = self.texts(prompts, prompt_mask, responses, response_mask)
            scores = self.reward_fn(prompt_texts, completions)
            if not hasattr(scores, "__len__") or len(scores) != len(completions):
                n = len(scores) if hasattr(scores, "__len__") else type(scores).__name__
                raise DataError(f"--reward_fn {self.args.reward_fn} returned {n} scores for {len(completions)} "
                                "completions; expected one float per (prompt, completion)")
            return torch.tensor([float(s) for s in scores], device=self.device)
        if self.reward_tokenizer is not None:  # a different vocabulary: go through text
            batch = retokenize(*self.texts(prompts, prompt_mask, responses, response_mask), has_eos, self.reward_tokenizer)
            input_ids, attention_mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        else:
            input_ids, attention_mask = torch.cat([prompts, responses], 1), torch.cat([prompt_mask, response_mask], 1)
        scores = score_tokens(self.reward_model, input_ids, attention_mask)
        scores = scores[torch.arange(len(scores), device=self.device), last_token_index(attention_mask)].float()
        return (scores - self.mean) / self.std


@torch.no_grad()
def generate(policy, prompts, prompt_mask, generation_config, chunk: int, pad_id: int):
    """Sample responses in chunks with the KV cache; -> [B, T] responses right-padded with pad_id."""
    outs = []
    for i in range(0, len(prompts), chunk):
        out = policy.generate(input_ids=prompts[i: i + chunk], attention_mask=prompt_mask[i: i + chunk],
                              generation_config=generation_config)
        outs.append(out[:, prompts.shape[1]:])
    width = max(o.shape[1] for o in outs)
    return torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[1]), value=pad_id) for o in outs])


@torch.no_grad()
def rollout_forward(model, ref_model, prompts, prompt_mask, responses, response_mask, chunk: int, temperature: float):
    """Log-probs, reference log-probs and (normalized) values of the sampled responses, in chunks."""
    logps, ref_logps, values = [], [], []
    context_length = prompts.shape[1]
    for i in range(0, len(prompts), chunk):
        ids = torch.cat([prompts[i: i + chunk], responses[i: i + chunk]], 1)
        mask = torch.cat([prompt_mask[i: i + chunk], response_mask[i: i + chunk]], 1)
        logits, value = model(ids, mask)
        logps.append(response_logprobs(logits, ids[:, context_length:], context_length, temperature))
        values.append(value[:, context_length - 1: -1].float())
        ref_logits = ref_model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from(mask)).logits
        ref_logps.append(response_logprobs(ref_logits, ids[:, context_length:], context_length, temperature))
    return torch.cat(logps), torch.cat(ref_logps), torch.cat(values)


# ---------------------------------------------------------------------------------------------
# ---- evaluation ----
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(accelerator, model, ref_model, scorer, eval_prompts, tokenizer, args, step):
    """Greedy responses to the held-out prompts (deterministic, so checkpoints compare fairly), scored by
    the reward; eval/kl is the summed log-ratio log pi - log pi_ref of those responses against the current
    reference. Each process takes every num_processes-th prompt; sums are reduced, so the mean is exact."""
    unwrapped = accelerator.unwrap_model(model)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, use_cache=True)
    local = eval_prompts[accelerator.process_index:: accelerator.num_processes]
    totals = torch.zeros(3, device=accelerator.device)
    samples = []
    n_chunks = math.ceil(len(eval_prompts) / accelerator.num_processes / args.per_device_eval_batch_size)
    for c in range(n_chunks):  # the same number of chunks on every process (ZeRO-3 forward passes are collective)
        part = local[c * args.per_device_eval_batch_size: (c + 1) * args.per_device_eval_batch_size] or eval_prompts[:1]
        count = len(local[c * args.per_device_eval_batch_size: (c + 1) * args.per_device_eval_batch_size])
        batch = {k: v.to(accelerator.device) for k, v in collate_prompts(part, tokenizer.pad_token_id).items()}
        with gathered_for_generation(accelerator, unwrapped.policy):
            responses = generate(unwrapped.policy, batch["input_ids"], batch["attention_mask"], config,
                                 args.per_device_eval_batch_size, tokenizer.pad_token_id)
        responses, response_mask, has_eos = truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
        logp, ref_logp, _ = rollout_forward(unwrapped, ref_model, batch["input_ids"], batch["attention_mask"],
                                            responses, response_mask, args.per_device_eval_batch_size, 1.0)
        scores = scorer(batch["input_ids"], batch["attention_mask"], responses, response_mask, has_eos)
        kl = ((logp - ref_logp) * response_mask).sum(1)
        totals += torch.stack([scores[:count].sum(), kl[:count].sum(), torch.tensor(float(count), device=kl.device)])
        if c == 0 and accelerator.is_main_process:
            texts = scorer.texts(batch["input_ids"], batch["attention_mask"], responses, response_mask)
            samples = [{"step": step, "prompt": p, "completion": r, "score": s}
                       for p, r, s in zip(*texts, scores.tolist())][: min(args.num_samples, count)]
    totals = accelerator.reduce(totals, "sum")
    if samples:
        with open(Path(args.output_dir) / "samples.jsonl", "a") as f:
            f.writelines(json.dumps(s) + "\n" for s in samples)
    return {"eval/score": (totals[0] / totals[2]).item(), "eval/kl": (totals[1] / totals[2]).item()}


# ---------------------------------------------------------------------------------------------
# ---- main ----
# ---------------------------------------------------------------------------------------------


def main(args: Args):
    # ---- validate arguments and data before any model is loaded ----
    if (args.reward_model_name_or_path is None) == (args.reward_fn is None):
        raise DataError("give exactly one of --reward_model_name_or_path and --reward_fn")
    if args.temperature <= 0:
        raise DataError("temperature must be > 0 (PPO needs sampled rollouts)")
    accelerator = Accelerator(
        mixed_precision="bf16" if args.bf16 else None,
        # Accumulation counts micro-batches per minibatch by hand (sync_with_dataloader=False); the number of
        # steps depends on the process count, so it is set below, before prepare().
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1, sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
    )
    sizes = derive_batch_sizes(args, accelerator.num_processes)
    ga = sizes["gradient_accumulation_steps"]
    accelerator.gradient_accumulation_steps = ga
    set_seed(args.seed)
    tokenizer = load_tokenizer(args)
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else None
    reward_tokenizer = None
    if args.reward_model_name_or_path:
        try:
            reward_tokenizer = AutoTokenizer.from_pretrained(args.reward_model_name_or_path,
                                                             trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError):
            print("reward model has no tokenizer of its own: assuming the policy's")
        if reward_tokenizer is not None and same_vocab(reward_tokenizer, tokenizer):
            reward_tokenizer = None
        elif reward_tokenizer is not None:
            if reward_tokenizer.eos_token_id is None:
                raise DataError(f"{args.reward_model_name_or_path}: its tokenizer differs from the policy's and has no "
                                "EOS token, so responses cannot be re-tokenized for it")
            if reward_tokenizer.pad_token_id is None:
                reward_tokenizer.pad_token = reward_tokenizer.eos_token
            print("reward model's tokenizer differs from the policy's: responses are decoded and re-tokenized")
    train_prompts = tokenize_prompts(to_prompts(load_split(args.dataset_name, args.dataset_config, args.train_split),
                                                args.filter), tokenizer, args.max_prompt_length, "train")
    eval_prompts = []
    if args.eval_split:
        eval_prompts = tokenize_prompts(to_prompts(load_split(args.dataset_name, args.dataset_config, args.eval_split),
                                                   args.filter), tokenizer, args.max_prompt_length, "eval")
    loader = torch.utils.data.DataLoader(train_prompts, batch_size=args.per_device_prompt_batch_size, shuffle=True,
                                         drop_last=True, collate_fn=lambda b: collate_prompts(b, tokenizer.pad_token_id))
    iters_per_epoch = len(train_prompts) // sizes["prompts_per_iteration"]
    if iters_per_epoch == 0:
        raise DataError(f"{len(train_prompts)} prompts make no full iteration of {args.per_device_prompt_batch_size} "
                        f"prompts x {accelerator.num_processes} processes")
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    elif args.total_episodes > 0:
        num_iterations = math.ceil(args.total_episodes / sizes["rollout_batch_size"])
    else:
        num_iterations = math.ceil(args.num_train_epochs * iters_per_epoch)
    resume_from = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
    accelerator.print("batch sizes: " + ", ".join(f"{k}={v}" for k, v in sizes.items()) + f", iterations={num_iterations}")

    # ---- models: policy + critic (trained), reference + reward (frozen); dropout off in all four ----
    frozen_dtype = torch.bfloat16 if args.bf16 else None
    load = dict(trust_remote_code=args.trust_remote_code)
    policy = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, **load)
    # With the reference EMA on, the reference stays in fp32: an EMA step of 0.01 * (policy - ref) is mostly
    # below bfloat16's resolution and would round to zero, silently switching key factor 3 off.
    ref_dtype = frozen_dtype if args.ref_ema == 0 else None
    ref_model = freeze(AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=ref_dtype, **load))
    reward_model = None
    if args.reward_model_name_or_path:
        reward_model = freeze(AutoModelForSequenceClassification.from_pretrained(
            args.reward_model_name_or_path, num_labels=1, dtype=frozen_dtype, **load))
    # Tulu 2.5 App. F: the critic starts from the reward model; with a reward function, from the policy.
    critic_path = args.value_model_name_or_path or args.reward_model_name_or_path or args.model_name_or_path
    critic = AutoModelForSequenceClassification.from_pretrained(critic_path, num_labels=1, **load)
    critic.config.pad_token_id = tokenizer.pad_token_id
    for m in (policy, critic):
        disable_dropout(m)
        if args.gradient_checkpointing:
            m.gradient_checkpointing_enable()
    model = PolicyAndValue(policy, critic)
    optimizer = torch.optim.AdamW([{"params": policy.parameters(), "lr": args.learning_rate},
                                   {"params": critic.parameters(), "lr": args.critic_learning_rate}],
                                  weight_decay=args.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    iters_per_epoch = min(iters_per_epoch, len(loader))  # the sharded loader's own count (they agree)
    ref_model.to(accelerator.device)
    if reward_model is not None:
        reward_model.to(accelerator.device)
    total_optimizer_steps = num_iterations * sizes["optimizer_steps_per_iteration"]
    scheduler = get_scheduler(args.lr_scheduler, optimizer,
                              num_warmup_steps=math.ceil(args.warmup_ratio * total_optimizer_steps),
                              num_training_steps=total_optimizer_steps)
    value_stats, kl_ctl = RunningMeanStd(), AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon)
    # Not prepared, so saved through register_for_checkpointing; the EMA'd reference is training state too.
    for obj in (scheduler, value_stats, kl_ctl, ref_model):
        accelerator.register_for_checkpointing(obj)
    scorer = Scorer(args, tokenizer, accelerator.device, reward_model, reward_tokenizer, reward_fn)
    generation_config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=args.temperature,
                                         top_k=args.top_k, top_p=args.top_p, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id, use_cache=True)

    step, best_score = 0, -math.inf
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        step = json.loads((resume_from / "step.json").read_text())["step"]
        accelerator.print(f"resumed from {resume_from} at iteration {step}")
    best_file = Path(args.output_dir) / "best" / "best.json"
    if args.resume_from_checkpoint and best_file.exists():
        best_score = json.loads(best_file.read_text())["eval/score"]
    if accelerator.is_main_process:
        write_args(args, args.output_dir)
    accelerator.init_trackers("ppo", config=asdict(args))
    log = MetricsLog(accelerator, args.output_dir)
    dump = os.environ.get("PPO_DUMP_PROCESS_METRICS")  # tests: per-process metrics, to check the reduction
    unwrapped = accelerator.unwrap_model(model)
    reduce_sum = lambda t: accelerator.reduce(t, "sum")  # noqa: E731  global rollout-batch statistics

    # ---- training loop: one iteration = rollout, then PPO updates, then the reference EMA ----
    bar = tqdm(total=num_iterations, initial=step, disable=not accelerator.is_main_process, desc="ppo")
    batches = None
    while step < num_iterations:
        if batches is None or step % iters_per_epoch == 0:
            loader.set_epoch(step // iters_per_epoch)  # the same prompt order on every process and after a resume
            skip = step % iters_per_epoch
            batches = iter(accelerator.skip_first_batches(loader, skip) if skip else loader)
        batch = next(batches)
        t0 = time.time()

        # ---- rollout ----
        model.eval()
        prompts = batch["input_ids"].repeat_interleave(args.samples_per_prompt, 0)
        prompt_mask = batch["attention_mask"].repeat_interleave(args.samples_per_prompt, 0)
        with gathered_for_generation(accelerator, unwrapped.policy):
            responses = generate(unwrapped.policy, prompts, prompt_mask, generation_config,
                                 args.local_rollout_forward_batch_size, tokenizer.pad_token_id)
        responses, response_mask, has_eos = truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
        logp, ref_logp, values = rollout_forward(unwrapped, ref_model, prompts, prompt_mask, responses, response_mask,
                                                 args.local_rollout_forward_batch_size, args.temperature)
        scores = torch.cat([scorer(prompts[i: i + args.local_rollout_forward_batch_size],
                                   prompt_mask[i: i + args.local_rollout_forward_batch_size],
                                   responses[i: i + args.local_rollout_forward_batch_size],
                                   response_mask[i: i + args.local_rollout_forward_batch_size],
                                   has_eos[i: i + args.local_rollout_forward_batch_size])
                            for i in range(0, len(prompts), args.local_rollout_forward_batch_size)])
        raw_scores = scores
        scores = apply_missing_eos_penalty(scores, has_eos, args.missing_eos_penalty)  # Tulu 2.5 App. F
        # Tulu 2.5 Eq. 4: clipped score on the last token, KL penalty on every token
        rewards, kl, non_score_reward = compute_rewards(scores, logp, ref_logp, response_mask, kl_ctl.value,
                                                        args.kl_estimator, args.reward_clip)
        mask = response_mask.float()
        # App. A.2 value normalization: the critic outputs normalized values; GAE needs them in reward units.
        if args.normalize_value:
            values = values * value_stats.std + value_stats.mean
        values = values * mask
        advantages, returns = compute_advantages(rewards, values, mask, args.gamma, args.lam, args.whiten_advantages,
                                                 reduce_sum)
        explained_variance = 1 - (masked_var(returns - values, mask, reduce_sum)
                                  / masked_var(returns, mask, reduce_sum).clamp(min=1e-8))
        if args.normalize_value:
            value_stats.update(returns, mask, reduce_sum)
            returns_target = (returns - value_stats.mean) / value_stats.std * mask
            old_values = (values - value_stats.mean) / value_stats.std * mask
        else:
            returns_target, old_values = returns, values
        rollout_seconds = time.time() - t0

        # ---- PPO update: ppo_epochs x num_minibatches optimizer steps, micro-batches accumulated ----
        t1 = time.time()
        model.train()
        stats = {k: [] for k in ("policy/approxkl", "policy/clipfrac", "loss/policy", "loss/value", "val/clipfrac")}
        n_mb, n_micro = sizes["local_minibatch_size"], args.per_device_train_batch_size
        context_length = prompts.shape[1]
        for _ in range(args.ppo_epochs):
            order = torch.randperm(len(prompts), device=prompts.device)
            for start in range(0, len(prompts), n_mb):
                mb = order[start: start + n_mb]
                # Normalize by the response tokens of the whole global minibatch, so 1 process and N processes
                # (and any accumulation) give the same gradient; DDP averages over processes, hence the factor.
                n_tokens = accelerator.reduce(mask[mb].sum(), "sum").clamp(min=1)
                for m0 in range(0, n_mb, n_micro):
                    idx = mb[m0: m0 + n_micro]
                    with accelerator.accumulate(model):
                        ids = torch.cat([prompts[idx], responses[idx]], 1)
                        attn = torch.cat([prompt_mask[idx], response_mask[idx]], 1)
                        logits, new_values = model(ids, attn)
                        new_logp = response_logprobs(logits, responses[idx], context_length, args.temperature)
                        new_values = new_values[:, context_length - 1: -1].float()
                        pg_loss, pg_stats = policy_loss(new_logp, logp[idx], advantages[idx], mask[idx],
                                                        args.clip_range, n_tokens)
                        vf_loss, vf_stats = value_loss(new_values, old_values[idx], returns_target[idx], mask[idx],
                                                       args.clip_range_value, n_tokens)
                        loss = pg_loss + args.vf_coef * vf_loss
                        accelerator.backward(loss * accelerator.num_processes * ga)
                        if accelerator.sync_gradients:
                            accelerator.clip_grad_norm_(unwrapped.policy.parameters(), args.max_grad_norm)
                            accelerator.clip_grad_norm_(unwrapped.critic.parameters(), args.max_grad_norm)
                            optimizer.step()
                            scheduler.step()
                            optimizer.zero_grad()
                    share = mask[idx].sum() / mask[mb].sum().clamp(min=1)  # micro-batch share of its minibatch
                    for k, v in (("policy/approxkl", pg_stats["approxkl"]), ("policy/clipfrac", pg_stats["clipfrac"]),
                                 ("val/clipfrac", vf_stats["clipfrac"])):
                        stats[k].append(v * share)
                    stats["loss/policy"].append(pg_loss.detach() * n_tokens / mask[mb].sum().clamp(min=1))
                    stats["loss/value"].append(vf_loss.detach() * n_tokens / mask[mb].sum().clamp(min=1))
        # ---- Sec. 5: reference-model EMA (key factor 3) ----
        with gathered_for_generation(accelerator, unwrapped.policy):
            ema_update(ref_model, unwrapped.policy, args.ref_ema)
        update_seconds = time.time() - t1
        step += 1
        bar.update(1)

        # ---- metrics: per-process means over the rollout, then the mean over processes ----
        n_minibatches = sizes["optimizer_steps_per_iteration"]
        sequence_kl = kl.sum(1)
        local = {
            "objective/scores": raw_scores.mean(),
            "objective/kl": sequence_kl.mean(),
            "objective/entropy": (-logp * mask).sum(1).mean(),  # sample estimate, summed over tokens
            "objective/non_score_reward": non_score_reward.sum(1).mean(),
            "objective/rlhf_reward": (scores.clamp(-args.reward_clip, args.reward_clip) + non_score_reward.sum(1)).mean(),
            "objective/kl_coef": torch.tensor(kl_ctl.value),
            **{k: torch.stack(v).sum() / n_minibatches for k, v in stats.items()},
            "val/explained_variance": explained_variance,
            "val/num_eos_tokens": has_eos.float().sum(),
            "time/rollout_seconds": torch.tensor(rollout_seconds),
            "time/update_seconds": torch.tensor(update_seconds),
            "memory/peak_gb": torch.tensor(peak_memory_gb(accelerator.device)),
        }
        local = {k: v.detach().float().to(accelerator.device) for k, v in local.items()}
        if dump:
            with open(Path(args.output_dir) / f"metrics_process{accelerator.process_index}.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **{k: v.item() for k, v in local.items()}}) + "\n")
        names = list(local)
        reduced = accelerator.reduce(torch.stack([local[k] for k in names]), "mean")
        metrics = dict(zip(names, reduced.tolist()))
        metrics["val/num_eos_tokens"] *= accelerator.num_processes  # a count over the global rollout batch
        kl_ctl.update(metrics["objective/kl"], sizes["rollout_batch_size"])
        metrics.update({"episode": step * sizes["rollout_batch_size"], "lr": scheduler.get_last_lr()[0],
                        "eps": sizes["rollout_batch_size"] / max(rollout_seconds + update_seconds, 1e-9)})
        if step % args.logging_steps == 0 or step == num_iterations:
            log.log(metrics, step)
        bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}",
                        eps=f"{metrics['eps']:.0f}")

        # ---- evaluation, best checkpoint (the paper selects the checkpoint with the best validation reward) ----
        if eval_prompts and (step % args.eval_steps == 0 or step == num_iterations):
            eval_metrics = evaluate(accelerator, model, ref_model, scorer, eval_prompts, tokenizer, args, step)
            log.log(eval_metrics, step)
            if eval_metrics["eval/score"] > best_score:
                best_score = eval_metrics["eval/score"]
                save_policy(accelerator, model, tokenizer, Path(args.output_dir) / "best")
                if accelerator.is_main_process:
                    best_file.write_text(json.dumps({"step": step, **eval_metrics}))
        if args.save_steps > 0 and step % args.save_steps == 0 and step < num_iterations:
            save_checkpoint(accelerator, args.output_dir, step)
    bar.close()

    # ---- save ----
    save_policy(accelerator, model, tokenizer, args.output_dir)
    accelerator.end_training()


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except DataError as e:
        sys.exit(f"error: {e}")
