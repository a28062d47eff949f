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

    python ppo.py --model_name_or_path SFT_DIR --reward_model_name_or_path RM_DIR --dataset_name prompts.jsonl
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml ppo.py ...

One iteration = rollout (generate, score, log-probs, values, rewards, GAE), then `ppo_epochs` passes of
clipped-PPO updates over the rollout batch in `num_minibatches` minibatches, then the reference EMA.
Self-contained on purpose: the helpers fenced at the bottom are repeated, byte-identical, in every
script that uses them.
"""

import contextlib
import hashlib
import importlib.util
import inspect
import json
import math
import os
import resource
import shutil
import signal
import socket
import sys
import time
import traceback
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    GradientAccumulationPlugin,
    broadcast_object_list,
    gather_object,
    set_seed,
)
from accelerate.utils import load as load_weights_only  # torch.load, weights_only=True
from datasets import Dataset, load_dataset
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
)


@dataclass
class Args:
    """PPO (RLHF): train an SFT policy against a reward model or a reward function, with the key
    factors of Xu et al. 2024 (advantage whitening, large batch, reference EMA).

    Offline example: python ppo.py --model_name_or_path outputs/sft --reward_model_name_or_path
    outputs/reward_model --dataset_name prompts.jsonl --output_dir outputs/ppo
    """

    # ---- models ----
    model_name_or_path: str = "EleutherAI/pythia-160m"
    """the SFT policy to start from (hub id or local directory); the reference policy is a frozen copy"""
    tokenizer_name_or_path: str | None = None
    """tokenizer of the policy (defaults to model_name_or_path)"""
    chat_template_path: str | None = None
    """a Jinja chat template file for a tokenizer without one (or to replace its own); saved with it"""
    reward_model_name_or_path: str | None = None
    """a reward_model.py checkpoint (AutoModelForSequenceClassification, num_labels=1) scoring responses"""
    reward_fn: str | None = None
    """instead of a reward model: 'path/to/file.py:function', (prompts, completions[, finished]) -> floats
    (runs that file's code)"""
    value_model_name_or_path: str | None = None
    """critic initialization (default: the reward model, Tulu 2.5 App. F; with --reward_fn, or a reward
    model whose vocabulary differs from the policy's: the policy checkpoint with a fresh scalar head)"""
    normalize_reward: bool = False
    """standardize scores with the reward_mean / reward_std stored in the reward model's config"""
    trust_remote_code: bool = False
    """allow model/tokenizer code from the hub to run (opt-in)"""
    attn_implementation: str | None = None
    """attention kernel of every model loaded: eager, sdpa, flash_attention_2, ... (None: transformers')"""
    # ---- prompts ----
    dataset_name: str = "Anthropic/hh-rlhf"
    """prompts: a 'prompt' column, or any preference / SFT dataset (its prompts are used); hub id or local file"""
    dataset_config: str | None = None
    """hub dataset configuration name"""
    train_split: str = "train"
    """split whose prompts drive the rollouts"""
    eval_split: str | None = None
    """held-out prompts for eval/score, eval/kl and best-checkpoint selection (None: no evaluation)"""
    max_prompt_length: int = 512
    """prompts longer than this keep their last tokens"""
    # ---- rollout (paper App. A.2: temperature 1.0, top-k 200, 256 new tokens on HH-RLHF) ----
    max_new_tokens: int = 256
    """maximum response length; generation stops at EOS"""
    temperature: float = 1.0
    """sampling temperature (log-probabilities are computed at the same temperature)"""
    top_k: int = 200
    """sample from the k most likely tokens (0: no top-k). The log-probabilities (ratio, KL, entropy)
    use the full softmax, as TRL does (ReaLHF masks them). Measured on the tests' tiny random Llama (a
    flat distribution over 400 tokens): top-k 200 raises a sampled token's probability by 0.57 nats
    over the full softmax; for a trained LM, whose mass is concentrated, far less (docs/ppo.md)"""
    top_p: float = 1.0
    """nucleus sampling threshold (1.0: off); like top-k, not applied to the log-probabilities"""
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
    """gradient clipping norm (actor and critic each; under DeepSpeed, one joint norm over both)"""
    gamma: float = 1.0
    """discount factor (paper App. A.2)"""
    lam: float = 1.0
    """GAE lambda (paper App. A.2)"""
    clip_range: float = 0.2
    """PPO ratio clipping epsilon"""
    clip_range_value: float = 0.2
    """value clipping range around the critic's rollout output (in the critic's output units: normalized
    when normalize_value)"""
    vf_coef: float = 0.1
    """value loss coefficient (Tulu 2.5 Table 9); with separate Adam groups it matters little under DDP,
    but it weights the joint clipping norm under DeepSpeed"""
    kl_coef: float = 0.1
    """KL penalty coefficient beta (paper App. A.2), fixed; per-token KL estimate k1 = log pi - log pi_ref"""
    reward_clip: float = 20.0
    """scores are clipped to +-reward_clip (paper App. A.2)"""
    missing_eos_penalty: float | None = None
    """EOS trick (Tulu 2.5 App. F): a response without EOS gets this score, e.g. -10.0 (None: off)"""
    whiten_advantages: bool = True
    """key factor 1 (Sec. 5): whiten advantages over the rollout batch (masked)"""
    normalize_value: bool = True
    """value normalization (App. A.2): the critic learns returns standardized by running statistics"""
    ref_ema: float = 0.01
    """key factor 3 (Sec. 5): after each iteration ref <- (1 - ref_ema) ref + ref_ema policy; 0 turns it
    off. The paper gives no rate; 0.01 per iteration is our choice (the authors' public ReaLHF example
    uses 0.001, 10x slower: with a few hundred iterations 0.001 barely moves the reference)"""
    # ---- run ----
    seed: int = 1
    """random seed (data order; each process samples with seed + 100003 x its index)"""
    bf16: bool = False
    """bfloat16 mixed precision (autocast); frozen models load in bfloat16, an EMA'd reference stays fp32"""
    gradient_checkpointing: bool = False
    """trade compute for memory in the policy and critic"""
    output_dir: str = "outputs/ppo"
    """where the policy, args.json, metrics.jsonl, samples.jsonl, best/ and checkpoints/ go"""
    overwrite_output_dir: bool = False
    """replace a previous run in output_dir (its checkpoints, metrics and model)"""
    logging_steps: int = 1
    """log metrics every this many iterations"""
    eval_steps: int = 10
    """evaluate on eval_split every this many iterations (and at the end)"""
    per_device_eval_batch_size: int = 16
    """eval prompts per generate chunk, per device"""
    save_steps: int = 0
    """write a resumable checkpoint every this many iterations (0: never)"""
    save_total_limit: int | None = None
    """keep only the newest N checkpoints, deleting older ones after each save (PPO's best/ is apart)"""
    resume_from_checkpoint: str | None = None
    """'latest' or a path to output_dir/checkpoints/step_N to continue from"""
    num_samples: int = 4
    """eval prompts whose responses are written to samples.jsonl at each eval"""
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    """experiment tracker"""
    project: str | None = None
    """tracker project (default: $WANDB_PROJECT for wandb, else the stage's name)"""
    run_name: str | None = None
    """tracker run name (default: wandb's $WANDB_NAME or its own; tensorboard: the project)"""


# ---- PPO math (pure functions; tests compare them with hand-written loops) ----
# Shapes: [B, T] over response tokens; `mask` is 1 on the response up to and including the first EOS
# (a prefix of each row), 0 after it. `reduce`, when given, sums a tensor over processes, so batch
# statistics are those of the global rollout batch (accelerator.reduce(t, "sum")).


def compute_rewards(scores, logp, ref_logp, mask, kl_coef: float, reward_clip: float | None = None):
    """Tulu 2.5 Eq. 4: r_t = -kl_coef * kl_t on every response token, with the k1 estimate
    kl_t = log pi - log pi_ref, plus the (clipped) score on the last real token.
    -> (rewards, kl, non_score_reward), all [B, T] and zero outside the mask. (k3 would be the wrong
    objective here: as a reward its gradient is grad KL(pi||ref) - grad KL(ref||pi).)"""
    mask = mask.to(logp.dtype)
    kl = (logp - ref_logp) * mask
    non_score_reward = -kl_coef * kl
    if reward_clip is not None:
        scores = scores.clamp(-reward_clip, reward_clip)
    rewards = non_score_reward.clone()
    rows = torch.arange(len(rewards), device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards, kl, non_score_reward


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


def masked_mean(x: torch.Tensor, mask: torch.Tensor, reduce=None) -> torch.Tensor:
    total = torch.stack([(x * mask).sum(), mask.sum().to(x.dtype)])
    if reduce is not None:
        total = reduce(total)
    return total[0] / total[1].clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, reduce=None) -> torch.Tensor:
    """Population variance of the masked entries."""
    mean = masked_mean(x, mask, reduce)
    return masked_mean((x - mean) ** 2, mask, reduce)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce=None):
    """(x - mean) / std over the masked entries; shift_mean=False keeps the mean. Masked-out -> 0."""
    mean, var = masked_mean(x, mask, reduce), masked_var(x, mask, reduce)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def compute_advantages(rewards, values, mask, gamma: float, lam: float, whiten: bool, reduce=None):
    """GAE advantages and returns; with `whiten` (key factor 1, Sec. 5) the advantages are whitened
    over the rollout batch, masked (Tulu 2.5 App. F: whiten advantages, not rewards). Returns are
    never whitened."""
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    if whiten:
        advantages = masked_whiten(advantages, mask, reduce=reduce)
    return advantages, returns


def policy_loss(new_logp, old_logp, advantages, mask, clip_range: float, n_tokens=None):
    """Clipped surrogate: mean over tokens of max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)). The sum
    is divided by n_tokens when given (the token count of the global minibatch), else by mask.sum().
    -> (loss, {clipfrac, approxkl})."""
    mask = mask.to(new_logp.dtype)
    ratio = torch.exp(new_logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.max(unclipped, clipped)
    loss = (per_token * mask).sum() / (mask.sum().clamp(min=1) if n_tokens is None else n_tokens)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(mask.dtype), mask),
            "approxkl": 0.5 * masked_mean((new_logp - old_logp) ** 2, mask),
        }
    return loss, stats


def value_loss(new_values, old_values, returns, mask, clip_range_value: float, n_tokens=None):
    """Clipped value loss: 0.5 * mean of max((V - G)^2, (V_clipped - G)^2) with V_clipped kept within
    +-clip_range_value of the critic's rollout output `old_values`. -> (loss, {clipfrac})."""
    mask = mask.to(new_values.dtype)
    change = (new_values - old_values).clamp(-clip_range_value, clip_range_value)
    clipped_values = old_values + change
    unclipped_sq, clipped_sq = (new_values - returns) ** 2, (clipped_values - returns) ** 2
    per_token = 0.5 * torch.max(unclipped_sq, clipped_sq)
    loss = (per_token * mask).sum() / (mask.sum().clamp(min=1) if n_tokens is None else n_tokens)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped_sq > unclipped_sq).to(mask.dtype), mask)}
    return loss, stats


class RunningMeanStd:
    """Running mean and variance of the returns (paper App. A.2 value normalization): the critic
    learns (G - mean) / std and its outputs are mapped back with V * std + mean before GAE. Batches
    are merged with Chan et al.'s parallel formula: the statistics of all returns seen so far."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0.0

    def update(self, x: torch.Tensor, mask: torch.Tensor, reduce=None):
        mask = mask.to(x.dtype)
        total = torch.stack([(x * mask).sum(), mask.sum()])
        if reduce is not None:
            total = reduce(total)
        n = total[1].item()
        if n == 0:
            return
        batch_mean = total[0].item() / n
        batch_var = masked_mean((x - batch_mean) ** 2, mask, reduce).item()
        delta, new_count = batch_mean - self.mean, self.count + n
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / new_count
        self.mean += delta * n / new_count
        self.var, self.count = m2 / new_count, new_count

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-8))

    def state_dict(self):
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state):
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


@torch.no_grad()
def ema_update(ref_model, policy_model, ref_ema: float, accelerator=None):
    """Sec. 5 reference-model EMA: ref <- (1 - ref_ema) * ref + ref_ema * policy (0: untouched).
    Under ZeRO-3 each pair of parameters is gathered whole, updated, and re-partitioned from rank 0."""
    if ref_ema == 0:
        return
    ref_params = dict(getattr(ref_model, "module", ref_model).named_parameters())
    policy_params = dict(policy_model.named_parameters())
    if ref_params.keys() != policy_params.keys():
        raise ValueError("reference and policy have different parameters")
    for name, p_ref in ref_params.items():
        with zero3_gathered(accelerator, [p_ref, policy_params[name]], modifier_rank=0):
            p_ref.lerp_(policy_params[name].detach().to(p_ref.dtype), ref_ema)


def response_logprobs(logits: torch.Tensor, responses: torch.Tensor, temperature: float):
    """Log-probabilities of the response tokens at the sampling temperature; `logits` are those of
    the positions that predict the response tokens ([B, R, V])."""
    return token_logprobs(logits / temperature, responses)


def derive_batch_sizes(args, num_processes: int) -> dict:
    """CleanRL-style derived sizes. One iteration samples `rollout_batch_size` responses, then each PPO
    epoch takes num_minibatches optimizer steps, each over `minibatch_size` responses made of
    gradient_accumulation_steps micro-batches of per_device_train_batch_size per device."""
    sizes = (args.per_device_prompt_batch_size, args.samples_per_prompt, args.num_minibatches,
             args.per_device_train_batch_size, args.ppo_epochs,
             args.local_rollout_forward_batch_size)  # fmt: skip
    if min(sizes) < 1:
        raise DataError(
            "batch sizes, samples_per_prompt, num_minibatches and ppo_epochs must be >= 1"
        )
    local_rollout = args.per_device_prompt_batch_size * args.samples_per_prompt
    local_minibatch = local_rollout // args.num_minibatches
    if local_rollout % args.num_minibatches or local_minibatch % args.per_device_train_batch_size:
        raise DataError(
            f"per-device rollout batch {local_rollout} (per_device_prompt_batch_size x "
            f"samples_per_prompt) must split into num_minibatches={args.num_minibatches} minibatches "
            f"of whole micro-batches of per_device_train_batch_size={args.per_device_train_batch_size}"
        )
    return {
        "local_rollout_batch_size": local_rollout,  # responses per device per iteration
        "rollout_batch_size": local_rollout * num_processes,  # responses per iteration (paper: 512)
        "prompts_per_iteration": args.per_device_prompt_batch_size * num_processes,
        "local_minibatch_size": local_minibatch,
        "minibatch_size": local_minibatch * num_processes,  # paper: 128
        "gradient_accumulation_steps": local_minibatch // args.per_device_train_batch_size,
        "optimizer_steps_per_iteration": args.ppo_epochs * args.num_minibatches,
    }


# ---- the rollout's pieces: prompts, policy and critic, sampling, log-probabilities ----


def collate_prompts(prompts: list, pad_id: int) -> dict:
    """Left-padded, so every response starts at the same column and generation appends on the right.
    The dataset's prompts (strings or messages) come along for the labeller (labeller_texts)."""
    ids = [p["prompt_ids"] for p in prompts]
    masks = [[1] * len(p) for p in ids]
    return {
        "input_ids": pad(ids, pad_id, "left"),
        "attention_mask": pad(masks, 0, "left"),
        "prompt": [p["prompt"] for p in prompts],
    }


class PolicyAndValue(torch.nn.Module):
    """Actor and critic in one module with one AdamW holding two parameter groups (actor lr, critic
    lr). Why one module: accelerate prepares a single model per DeepSpeed engine, so one wrapper runs
    the same under DDP, ZeRO-2 and ZeRO-3 with one backward; the parameters stay separate (paper
    App. A.2). forward -> (logits [B, R, V], values [B, R]) for the R response tokens only: the
    logits of prompt positions are never computed (logits_to_keep)."""

    def __init__(self, policy, critic):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, input_ids, attention_mask, response_length: int, with_values: bool = True):
        logits = response_logits(self.policy, input_ids, attention_mask, response_length)
        if not with_values:
            return logits, None
        values = score_tokens(self.critic, input_ids, attention_mask)
        return logits, values[:, -response_length - 1 : -1].float()


def response_logits(lm, input_ids, attention_mask, response_length: int):
    """The logits [B, R, V] that predict the last R tokens (position t predicts token t + 1)."""
    return lm(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from(attention_mask),
        use_cache=False,
        logits_to_keep=response_length + 1,
    ).logits[:, :-1]


@torch.no_grad()
def generate(accelerator, policy, prompts, prompt_mask, config, chunk: int, pad_id: int,
             with_logps: bool = False):  # fmt: skip
    """Sample in chunks with the KV cache, in eval mode (gradient checkpointing in train mode drops the
    cache), the ZeRO-3 weights gathered once for the whole rollout. -> [B, T] right-padded; with
    with_logps, (responses, their log-probabilities [B, T] at config.temperature, from this pass)."""
    outs, logps = [], []
    was_training = policy.training
    policy.eval()
    with zero3_gathered(accelerator, policy.parameters()), accelerator.autocast():
        for i in range(0, len(prompts), chunk):
            ids, mask = prompts[i : i + chunk], prompt_mask[i : i + chunk]
            keep = [SampledLogprobs(config.temperature)] if with_logps else []
            out = policy.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                  logits_processor=LogitsProcessorList(keep))  # fmt: skip
            outs.append(out[:, prompts.shape[1] :])
            logps += [keep[0].result(outs[-1])] if with_logps else []
    policy.train(was_training)
    width = max(o.shape[1] for o in outs)
    pads = [torch.nn.functional.pad(o, (0, width - o.shape[1]), value=pad_id) for o in outs]
    if not with_logps:
        return torch.cat(pads)
    logps = [torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in logps]
    return torch.cat(pads), torch.cat(logps)


@torch.no_grad()
def rollout_forward(accelerator, model, ref_model, prompts, prompt_mask, responses, response_mask,
                    chunk: int, temperature: float, with_values: bool = True, logps=None):  # fmt: skip
    """Log-probs, reference log-probs and the critic's (normalized) values of the sampled responses,
    in chunks, under the same autocast as the training forward. -> three [B, R] tensors. `logps`:
    the policy's, from the generation pass; then the policy is not run again."""
    new_logps, ref_logps, values = [], [], []
    R = responses.shape[1]
    for i in range(0, len(prompts), chunk):
        ids = torch.cat([prompts[i : i + chunk], responses[i : i + chunk]], 1)
        mask = torch.cat([prompt_mask[i : i + chunk], response_mask[i : i + chunk]], 1)
        with accelerator.autocast():
            if logps is None:
                logits, value = model(ids, mask, R, with_values)
                new_logps.append(response_logprobs(logits, ids[:, -R:], temperature))
            elif with_values:  # the critic alone, as PolicyAndValue computes its values
                value = score_tokens(model.critic, ids, mask)[:, -R - 1 : -1].float()
            ref_logits = response_logits(ref_model, ids, mask, R)
            ref_logps.append(response_logprobs(ref_logits, ids[:, -R:], temperature))
        values.append(value if with_values else torch.zeros_like(ref_logps[-1]))
    logps = torch.cat(new_logps) if logps is None else logps
    return logps, torch.cat(ref_logps), torch.cat(values)


# ---- evaluation: greedy responses to held-out prompts ----


@torch.no_grad()
def evaluate(accelerator, model, ref_model, scorer, eval_prompts, tokenizer, args, step):
    """Greedy responses to the held-out prompts (deterministic, so checkpoints compare fairly), scored
    by the reward with the missing-EOS penalty, as training scores them (eval/raw_score: without
    it); eval/kl is the summed log-ratio log pi - log pi_ref of those responses against the
    current reference. Each process takes every num_processes-th prompt; sums are reduced. The critic
    is not run."""
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    config = generation_config(tokenizer, args.max_new_tokens, do_sample=False)
    local = eval_prompts[accelerator.process_index :: accelerator.num_processes]
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    totals = torch.zeros(4, device=accelerator.device)  # score, raw score, KL sums; count
    samples, b = [], args.per_device_eval_batch_size
    n_chunks = math.ceil(len(eval_prompts) / accelerator.num_processes / b)
    was_training = model.training
    model.eval()
    for c in range(n_chunks):  # the same number of chunks on every process (ZeRO-3 is collective)
        part = local[c * b : (c + 1) * b]
        count = len(part)
        batch = collate_prompts(part or eval_prompts[:1], pad_id)
        prompts = batch["input_ids"].to(accelerator.device)
        prompt_mask = batch["attention_mask"].to(accelerator.device)
        responses = generate(accelerator, unwrapped.policy, prompts, prompt_mask, config, b, pad_id)
        responses, response_mask, has_eos = truncate_after_eos(responses, eos_id, pad_id)
        prompt_and_response = (prompts, prompt_mask, responses, response_mask)
        logp, ref_logp, _ = rollout_forward(
            accelerator, unwrapped, ref_model, *prompt_and_response, b, 1.0, with_values=False
        )
        raw_scores = scorer(*prompt_and_response, has_eos, batch["prompt"])
        # scored as training scores it (the EOS trick), so best/ never keeps a policy that never stops
        scores = apply_missing_eos_penalty(raw_scores, has_eos, args.missing_eos_penalty)
        kl = ((logp - ref_logp) * response_mask).sum(1)
        sums = [scores[:count].sum(), raw_scores[:count].sum(), kl[:count].sum()]
        totals += torch.stack([*sums, kl.new_tensor(float(count))])
        if c == 0 and accelerator.is_main_process:
            texts = scorer.texts(*prompt_and_response, batch["prompt"])
            rows = zip(*texts, scores.tolist(), raw_scores.tolist())
            samples = [
                {"step": step, "prompt": p, "completion": r, "score": s, "raw_score": raw}
                for p, r, s, raw in rows
            ][: min(args.num_samples, count)]
    model.train(was_training)
    totals = accelerator.reduce(totals, "sum")
    score, raw_score, kl = (totals[:3] / totals[3]).tolist()
    if samples:
        with open(Path(args.output_dir) / "samples.jsonl", "a") as f:
            f.writelines(json.dumps(s) + "\n" for s in samples)
    return {"eval/score": score, "eval/raw_score": raw_score, "eval/kl": kl}


# ---- one iteration in three phases: rollout, PPO update, reference EMA ----


def rollout(
    args, accelerator, model, ref_model, scorer, batch, tokenizer, config, value_stats, step
):
    """Phase 1 (no gradients): sample samples_per_prompt responses per prompt (generation `config`), cut them at EOS, score
    them, and turn scores into per-token rewards, advantages and the critic's targets. -> a dict of
    [B, R] tensors for the update, and `sums`: the global rollout statistics."""
    model.eval()
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    reduce_sum = lambda t: accelerator.reduce(t, "sum")  # global rollout-batch statistics
    prompts = batch["input_ids"].repeat_interleave(args.samples_per_prompt, 0)
    prompt_mask = batch["attention_mask"].repeat_interleave(args.samples_per_prompt, 0)
    originals = [p for p in batch["prompt"] for _ in range(args.samples_per_prompt)]
    chunk, pad_id = args.local_rollout_forward_batch_size, tokenizer.pad_token_id
    sampling = (accelerator, unwrapped.policy, prompts, prompt_mask, config)
    # fp32: the policy's log-probs come from the generation pass (within ~1e-6 of a second
    # forward). Under bf16 the cached pass and a full forward differ by ~1e-2: recomputed.
    if args.bf16:
        responses, gen_logp = generate(*sampling, chunk, pad_id), None
    else:
        responses, gen_logp = generate(*sampling, chunk, pad_id, with_logps=True)
    responses, response_mask, has_eos = truncate_after_eos(
        responses, tokenizer.eos_token_id, pad_id
    )
    sequences = (prompts, prompt_mask, responses, response_mask)
    # `values` are the critic's raw outputs, in its own (normalized) units
    logp, ref_logp, values = rollout_forward(
        accelerator, unwrapped, ref_model, *sequences, chunk, args.temperature, logps=gen_logp
    )
    # one scalar per response: the reward model at the last real token (--normalize_reward: with
    # the statistics reward_model.py stored), or the reward function (Scorer, below the fence)
    with accelerator.autocast():
        raw_scores = scorer(*sequences, has_eos, originals)
    # Tulu 2.5 App. F: the EOS trick
    scores = apply_missing_eos_penalty(raw_scores, has_eos, args.missing_eos_penalty)
    # Tulu 2.5 Eq. 4: clipped score on the last token, KL penalty on every token
    rewards, kl, non_score_reward = compute_rewards(
        scores, logp, ref_logp, response_mask, args.kl_coef, args.reward_clip
    )
    mask = response_mask.float()
    sums = reduce_sum(torch.stack([
        raw_scores.sum(), kl.sum(), (-logp * mask).sum(), non_score_reward.sum(),
        scores.clamp(-args.reward_clip, args.reward_clip).sum() + non_score_reward.sum(),
        has_eos.float().sum(), torch.tensor(float(len(scores)), device=scores.device),
    ]))  # fmt: skip
    check_finite(sums, "score or KL", step + 1)
    # App. A.2 value normalization: GAE needs values in reward units (statistics before update)
    old_values = values * mask  # the clip window's centre: the critic's own rollout output
    if args.normalize_value:
        values = values * value_stats.std + value_stats.mean
    values = values * mask
    advantages, returns = compute_advantages(
        rewards, values, mask, args.gamma, args.lam, args.whiten_advantages, reduce_sum
    )
    residual_var = masked_var(returns - values, mask, reduce_sum)
    explained_variance = 1 - residual_var / masked_var(returns, mask, reduce_sum).clamp(min=1e-8)
    # the critic's targets, in its units: normalized with the new statistics
    returns_target = returns
    if args.normalize_value:
        value_stats.update(returns, mask, reduce_sum)
        returns_target = (returns - value_stats.mean) / value_stats.std * mask
    return {"prompts": prompts, "prompt_mask": prompt_mask, "responses": responses,
            "response_mask": response_mask, "mask": mask, "logp": logp, "old_values": old_values,
            "advantages": advantages, "returns_target": returns_target, "sums": sums,
            "explained_variance": explained_variance.item()}  # fmt: skip


def ppo_loss(args, accelerator, model, ro: dict, idx, n_tokens):
    """The clipped policy loss plus vf_coef x the clipped value loss on the rollout rows `idx`, each
    divided by the global minibatch's token count n_tokens. -> (loss, token sums of approxkl,
    clipfrac, val/clipfrac, loss/policy, loss/value and the token count)"""
    responses = ro["responses"][idx]
    ids = torch.cat([ro["prompts"][idx], responses], 1)
    attn = torch.cat([ro["prompt_mask"][idx], ro["response_mask"][idx]], 1)
    with accelerator.autocast():
        logits, new_values = model(ids, attn, responses.shape[1])
    new_logp = response_logprobs(logits, responses, args.temperature)
    m = ro["mask"][idx]
    pg_loss, pg = policy_loss(
        new_logp, ro["logp"][idx], ro["advantages"][idx], m, args.clip_range, n_tokens
    )
    vf_loss, vf = value_loss(
        new_values,
        ro["old_values"][idx],
        ro["returns_target"][idx],
        m,
        args.clip_range_value,
        n_tokens,
    )
    n = m.sum()
    sums = [pg["approxkl"] * n, pg["clipfrac"] * n, vf["clipfrac"] * n,
            pg_loss.detach() * n_tokens, vf_loss.detach() * n_tokens, n]  # fmt: skip
    return pg_loss + args.vf_coef * vf_loss, torch.stack(sums)


def ppo_update(args, accelerator, model, optimizer, scheduler, ro: dict, n_mb: int, step: int):
    """Phase 2: ppo_epochs passes over the rollout in shuffled minibatches of n_mb rows (per process),
    one optimizer step each, its micro-batches of per_device_train_batch_size accumulated. -> the
    local sums of ppo_loss's statistics."""
    model.train()
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    parts = [unwrapped.policy, unwrapped.critic]  # actor and critic clipped, each to its own norm
    reduce_sum = lambda t: accelerator.reduce(t, "sum")
    n_micro, n_rows = args.per_device_train_batch_size, len(ro["prompts"])
    # DDP averages over processes and backward divides by ga: the loss is a global token mean
    scale = accelerator.num_processes * accelerator.gradient_accumulation_steps
    update_sums = torch.zeros(6, device=accelerator.device)
    for _ in range(args.ppo_epochs):
        order = torch.randperm(n_rows, device=ro["prompts"].device)
        for start in range(0, n_rows, n_mb):
            mb = order[start : start + n_mb]
            # the response tokens of the whole global minibatch: 1 and N processes (and any
            # accumulation) give the same gradient
            n_tokens = reduce_sum(ro["mask"][mb].sum()).clamp(min=1)
            loss_sum = torch.zeros((), device=accelerator.device)
            for m0 in range(0, n_mb, n_micro):
                with accelerator.accumulate(model):
                    loss, sums = ppo_loss(
                        args, accelerator, model, ro, mb[m0 : m0 + n_micro], n_tokens
                    )
                    loss_sum = loss_sum + loss.detach()
                    if m0 + n_micro >= n_mb:  # the last micro-batch: DeepSpeed steps in backward
                        check_finite(reduce_sum(loss_sum), "loss", step + 1)
                    optimizer_step(
                        accelerator, loss * scale, parts, optimizer, scheduler, args.max_grad_norm
                    )
                update_sums += sums
    return update_sums


def iteration_metrics(ro_sums, update_sums, explained_variance, seconds, step, sizes, lr, device):
    """The metric names of TRL's PPOTrainer and CleanRL: global sums divided once."""
    r, u = ro_sums.tolist(), update_sums.tolist()
    n_seq, n_tok = r[6], max(u[5], 1.0)
    return {
        "objective/scores": r[0] / n_seq,
        "objective/kl": r[1] / n_seq,  # per-response sum of the per-token KL, mean over responses
        "objective/entropy": r[2] / n_seq,  # sample estimate, summed over tokens
        "objective/non_score_reward": r[3] / n_seq,
        "objective/rlhf_reward": r[4] / n_seq,
        "policy/approxkl": u[0] / n_tok,
        "policy/clipfrac": u[1] / n_tok,
        "val/clipfrac": u[2] / n_tok,
        "loss/policy": u[3] / n_tok,
        "loss/value": u[4] / n_tok,
        "val/explained_variance": explained_variance,
        "val/num_eos_tokens": r[5],
        "episode": step * sizes["rollout_batch_size"],
        "lr": lr,
        "eps": sizes["rollout_batch_size"] / max(sum(seconds), 1e-9),
        "time/rollout_seconds": seconds[0],
        "time/update_seconds": seconds[1],
        "memory/peak_gb": peak_memory_gb(device),
    }


def main(args: Args):
    # ---- arguments and data, checked before any model is loaded ----
    check_args(args)
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else None
    # accumulation counts micro-batches per minibatch; the number depends on the process count
    accelerator = make_accelerator(args, 1)
    sizes = derive_batch_sizes(args, accelerator.num_processes)
    ga = accelerator.gradient_accumulation_steps = sizes["gradient_accumulation_steps"]
    describe_run(accelerator, args.per_device_train_batch_size, ga, "responses")
    set_seed(args.seed)
    tokenizer = load_tokenizer(args)
    reward_tokenizer = load_reward_tokenizer(args, tokenizer)
    train_prompts = load_prompts(args, tokenizer, args.train_split)
    eval_prompts = load_prompts(args, tokenizer, args.eval_split) if args.eval_split else []
    loader = prompt_loader(train_prompts, args.per_device_prompt_batch_size, tokenizer, args.seed)
    iters_per_epoch, num_iterations = count_iterations(args, len(train_prompts), sizes)
    resume_from = find_checkpoint(accelerator, args.output_dir, args.resume_from_checkpoint)
    # refuse to mix runs; a resume must also share the process count and the training prompts
    n = accelerator.num_processes
    on_main(accelerator, prepare_output_dir, args, resume_from, n, train_prompts)
    on_main(accelerator, start_tracker, accelerator, args, "ppo", resume_from is not None)
    sizes_line = ", ".join(f"{k}={v}" for k, v in sizes.items())
    accelerator.print(f"{sizes_line}, iterations={num_iterations}")

    # ---- models: policy + critic in one module and one optimizer; frozen reference and reward ----
    policy, ref_model, reward_model, critic = load_models(args, tokenizer, reward_tokenizer)
    sampling_config = generation_config(
        tokenizer, args.max_new_tokens, True, args.temperature, args.top_k, args.top_p
    )
    policy.generation_config = sampling_config  # saved with the policy
    if args.gradient_checkpointing:
        policy.activation_checkpointing_enable()
        critic.activation_checkpointing_enable()
    model = PolicyAndValue(policy, critic)
    optimizer = adamw(
        accelerator,
        [{"params": policy.parameters(), "lr": args.learning_rate},
         {"params": critic.parameters(), "lr": args.critic_learning_rate}],
        weight_decay=args.weight_decay,
    )  # fmt: skip
    model, optimizer, loader = prepare_for_training(
        accelerator, args.max_grad_norm, model, optimizer, loader
    )
    # a checkpoint opens with from_pretrained: the policy at its root, the critic in critic/
    parts = lambda m: {"": ("policy.", m.policy), "critic": ("critic.", m.critic)}
    checkpoints_open_as_models(accelerator, tokenizer, parts)
    # Each process draws its own sampling noise (after prepare: the data order stays shared).
    torch.manual_seed(args.seed + 100003 * accelerator.process_index)
    ref_model = prepare_frozen(accelerator, ref_model)
    reward_model = prepare_frozen(accelerator, reward_model) if reward_model is not None else None
    # the sharded loader's own count (the two agree)
    iters_per_epoch = min(iters_per_epoch, len(loader))
    total_optimizer_steps = num_iterations * sizes["optimizer_steps_per_iteration"]
    scheduler = lr_schedule(optimizer, args.lr_scheduler, args.warmup_ratio, total_optimizer_steps)
    value_stats = RunningMeanStd()
    scorer = Scorer(args, tokenizer, accelerator.device, reward_model, reward_tokenizer, reward_fn)

    # ---- resume, trackers ----
    step, best_score = 0, -math.inf
    if resume_from is not None:
        step, best_score = load_ppo_checkpoint(
            accelerator, resume_from, scheduler, value_stats, ref_model
        )
    log = MetricsLog(accelerator, args.output_dir, step)
    if step and accelerator.is_main_process:  # evaluations after the checkpoint are re-run
        keep_rows_up_to(Path(args.output_dir) / "samples.jsonl", step)

    # ---- training loop: one iteration = rollout, then PPO updates, then the reference EMA ----
    bar = tqdm(
        total=num_iterations, initial=step, disable=not accelerator.is_main_process, desc="ppo"
    )
    batches = None
    STOP.deferred = True  # a signal now stops the loop at the end of an iteration (StopSignal)
    while step < num_iterations:
        if batches is None or step % iters_per_epoch == 0:
            # the same prompt order everywhere and on resume
            loader.set_epoch(step // iters_per_epoch)
            skip = step % iters_per_epoch
            batches = iter(accelerator.skip_first_batches(loader, skip) if skip else loader)
        batch = next(batches)
        t0 = time.time()
        ro = rollout(args, accelerator, model, ref_model, scorer, batch, tokenizer,
                     sampling_config, value_stats, step)  # fmt: skip
        t1 = time.time()
        n_mb = sizes["local_minibatch_size"]
        update_sums = ppo_update(args, accelerator, model, optimizer, scheduler, ro, n_mb, step)
        # Sec. 5: reference-model EMA (key factor 3)
        ema_update(ref_model, accelerator.unwrap_model(model).policy, args.ref_ema, accelerator)
        seconds = (t1 - t0, time.time() - t1)
        step += 1
        bar.update(1)

        # ---- metrics: global sums and counts, divided once ----
        metrics = iteration_metrics(
            ro["sums"], accelerator.reduce(update_sums, "sum"), ro["explained_variance"], seconds,
            step, sizes, scheduler.get_last_lr()[0], accelerator.device,
        )  # fmt: skip
        if step % args.logging_steps == 0 or step == num_iterations:
            log.log(metrics, step)
        bar.set_postfix(
            score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}"
        )

        # ---- evaluation, best checkpoint (the paper selects the best validation reward) ----
        if eval_prompts and (step % args.eval_steps == 0 or step == num_iterations):
            eval_metrics = evaluate(
                accelerator, model, ref_model, scorer, eval_prompts, tokenizer, args, step
            )
            check_finite(torch.tensor(eval_metrics["eval/score"]), "eval/score", step)
            log.log(eval_metrics, step)
            if eval_metrics["eval/score"] > best_score:
                best_score = eval_metrics["eval/score"]
                best = {"best.json": {"step": step, **eval_metrics}}  # saved with its policy
                save_policy(accelerator, model, tokenizer, Path(args.output_dir) / "best", best)
        state = {"scheduler": scheduler.state_dict(), "value_stats": value_stats.state_dict(),
                 "best_score": best_score}  # fmt: skip
        # the EMA'd reference is written into the checkpoint before its rename
        reference = lambda folder: save_reference(accelerator, ref_model, folder)
        checkpoint_or_stop(accelerator, args, step, num_iterations, state, reference)
    bar.close()

    # ---- save ----
    save_policy(accelerator, model, tokenizer, args.output_dir)
    end_training(accelerator)


# ---- this stage's plumbing (not shared) ----


def load_prompts(args, tokenizer, split: str) -> list:
    """{prompt, prompt_ids} rows of a split; the labeller reads the dataset's own prompt."""
    prompts = to_prompts(load_split(args.dataset_name, args.dataset_config, split))
    max_length = args.max_prompt_length + args.max_new_tokens
    return tokenize_prompts(prompts, tokenizer, max_length, args.max_prompt_length, split)


def count_iterations(args, n_prompts: int, sizes: dict) -> tuple:
    """-> (iterations per epoch, iterations of the run: --num_iterations, else from --total_episodes,
    else from --num_train_epochs)"""
    iters_per_epoch = n_prompts // sizes["prompts_per_iteration"]
    if iters_per_epoch == 0:
        raise DataError(
            f"{n_prompts} prompts make no full iteration of {args.per_device_prompt_batch_size} "
            f"prompts x {sizes['prompts_per_iteration'] // args.per_device_prompt_batch_size} processes"
        )
    if args.num_iterations > 0:
        return iters_per_epoch, args.num_iterations
    if args.total_episodes > 0:
        return iters_per_epoch, math.ceil(args.total_episodes / sizes["rollout_batch_size"])
    return iters_per_epoch, math.ceil(args.num_train_epochs * iters_per_epoch)


def check_args(args: Args):
    """Argument mistakes, reported in one line before anything loads."""
    if (args.reward_model_name_or_path is None) == (args.reward_fn is None):
        raise DataError("give exactly one of --reward_model_name_or_path and --reward_fn")
    if args.temperature <= 0:
        raise DataError("temperature must be > 0 (PPO needs sampled rollouts)")
    positive = ("logging_steps", "eval_steps", "max_prompt_length", "max_new_tokens",
                "per_device_eval_batch_size")  # fmt: skip
    check_common_args(args, positive)
    if not args.critic_learning_rate > 0:
        raise DataError(f"--critic_learning_rate must be > 0, got {args.critic_learning_rate}")
    if not 0 <= args.ref_ema <= 1:
        raise DataError(f"--ref_ema must be within [0, 1], got {args.ref_ema}")
    if args.num_samples < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        raise DataError("--num_samples, --top_k must be >= 0 and --top_p within (0, 1]")
    if args.value_model_name_or_path:
        check_model_path(args.value_model_name_or_path, "value model")
    if args.reward_model_name_or_path:
        check_reward_model(args.reward_model_name_or_path, args.trust_remote_code)
    if args.normalize_reward:  # never a silent mean 0 / std 1
        path = args.reward_model_name_or_path
        config = path and AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code)
        if not (hasattr(config, "reward_mean") and hasattr(config, "reward_std")):
            raise DataError(
                f"--normalize_reward needs the reward_mean and reward_std that reward_model.py "
                f"stores in a reward model's config; {path or '--reward_fn'} has none"
            )


def load_models(args, tokenizer, reward_tokenizer):
    """-> (policy, reference, reward model or None, critic). Policy and critic are trained in fp32
    (mixed precision from --bf16 autocast or DeepSpeed); the frozen reward model loads in bf16 under
    --bf16; the reference in fp32 when EMA'd (an EMA step of 0.01 * (policy - ref) is mostly below
    bfloat16's resolution); dropout is off in all four."""
    frozen_dtype = torch.bfloat16 if args.bf16 else torch.float32
    ref_dtype = torch.float32 if args.ref_ema > 0 else frozen_dtype
    seq_cls = AutoModelForSequenceClassification
    policy = load_pretrained(AutoModelForCausalLM, args.model_name_or_path, torch.float32, args)
    disable_dropout(policy)
    with full_fp32_under_zero3(args.ref_ema > 0):  # ZeRO-3 bf16 would build it in bf16
        ref_model = load_pretrained(AutoModelForCausalLM, args.model_name_or_path, ref_dtype, args)
    reward_model = None
    if rm_path := args.reward_model_name_or_path:
        reward_model = load_pretrained(seq_cls, rm_path, frozen_dtype, args, num_labels=1)
        # score_tokens runs HF's own forward, which needs a pad id to batch (its pooling is not used)
        reward_model.config.pad_token_id = (reward_tokenizer or tokenizer).pad_token_id
    # Tulu 2.5 App. F: the critic starts from the reward model; with a reward function, or a reward
    # model that reads another vocabulary, from the policy with a fresh scalar head.
    critic_path = args.value_model_name_or_path or args.reward_model_name_or_path
    if args.value_model_name_or_path is None and reward_tokenizer is not None:
        print(
            "the reward model's vocabulary differs from the policy's: the critic starts from the "
            "policy with a fresh value head (set --value_model_name_or_path to choose)"
        )
        critic_path = None
    critic_path = critic_path or args.model_name_or_path
    critic = load_pretrained(seq_cls, critic_path, torch.float32, args, num_labels=1)
    disable_dropout(critic)
    critic.config.pad_token_id = tokenizer.pad_token_id
    return policy, ref_model, reward_model, critic


@contextlib.contextmanager
def full_fp32_under_zero3(enable: bool):
    """Load outside DeepSpeed's zero.Init: under ZeRO-3 with bf16, zero.Init builds every model in bf16,
    whatever dtype is asked for, and the EMA'd reference must stay fp32 (prepare_frozen partitions it
    afterwards, in fp32)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    if enable:
        hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def save_policy(accelerator, model, tokenizer, output_dir, extra: dict | None = None):
    """The policy alone, loadable with plain AutoModelForCausalLM.from_pretrained (ZeRO-3 safe), and
    `extra` ({file name: JSON}) beside it; all moved into place together (write_model_dir)."""
    state_dict = full_state_dict(accelerator, model)

    def write(folder: Path):
        policy_state = {
            k[len("policy.") :]: v for k, v in state_dict.items() if k.startswith("policy.")
        }
        policy = accelerator.unwrap_model(model, keep_torch_compile=False).policy
        policy.save_pretrained(folder, state_dict=policy_state, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        for name, value in (extra or {}).items():
            (folder / name).write_text(json.dumps(value))

    on_main(accelerator, write_model_dir, output_dir, write)
    accelerator.wait_for_everyone()  # a barrier last: gloo can hang at exit on a broadcast's cleanup


def save_reference(accelerator, ref_model, folder: Path):
    """The EMA'd reference is training state: folder/reference.safetensors in a checkpoint being
    written (full tensors under ZeRO-3; every process takes part)."""
    tensors = {}
    for name, p in getattr(ref_model, "module", ref_model).named_parameters():
        with zero3_gathered(accelerator, [p]):
            if accelerator.is_main_process:
                tensors[name] = p.detach().cpu().clone().contiguous()
    if accelerator.is_main_process:
        save_file(tensors, str(folder / "reference.safetensors"))


@torch.no_grad()
def load_reference(accelerator, ref_model, folder: Path):
    path = folder / "reference.safetensors"
    try:
        tensors = load_file(str(path))
    except Exception as e:  # missing or damaged: safetensors' message does not name the file
        raise ValueError(f"{path.name} (the EMA'd reference): {e}") from None
    for name, p in getattr(ref_model, "module", ref_model).named_parameters():
        with zero3_gathered(accelerator, [p], modifier_rank=0):
            p.copy_(tensors[name].to(p.dtype))


def load_ppo_checkpoint(accelerator, path: Path, scheduler, value_stats, ref_model) -> tuple:
    """accelerate's state, then ours: step.json (step, scheduler, value statistics, best score) and
    the EMA'd reference beside it; a damaged one stops with one line. -> (step, best score)"""

    def restore(state: dict):  # a missing or garbled entry raises here
        scheduler.load_state_dict(state["scheduler"])
        value_stats.load_state_dict(state["value_stats"])
        state["best_score"] = float(state["best_score"])
        load_reference(accelerator, ref_model, path)

    state = load_checkpoint(accelerator, path, restore)
    return state["step"], state["best_score"]


def peak_memory_gb(device) -> float:
    if torch.cuda.is_available() and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # CPU: peak RSS (KiB on Linux)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def prompt_loader(prompts: list, batch_size: int, tokenizer, seed: int):
    """Shuffled batches of whole prompts (the last partial batch dropped)."""
    return torch.utils.data.DataLoader(
        prompts,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=lambda b: collate_prompts(b, tokenizer.pad_token_id),
        # Its own generator: torch draws a seed from it for each new iterator (a resume mid-epoch
        # makes one more), not from the global RNG of sampling and dropout. The order comes from
        # accelerate's seedable sampler, which reseeds it with seed + epoch.
        generator=torch.Generator().manual_seed(seed),
    )


class SampledLogprobs(LogitsProcessor):
    """The policy's log-probabilities of the tokens it samples, taken from the generation pass (no
    second forward). transformers 5 runs a custom processor after its own logits processors and
    before the temperature, top-k and top-p warpers: it sees the model's logits, applies the
    temperature itself, and top-k/top-p never enter the log-probabilities (they only pick the
    sample), as in the recompute. It returns the scores unchanged, so sampling is too. Memory: one
    step's [B, V] logits, kept until the next call reveals the token sampled from them."""

    def __init__(self, temperature: float):
        self.temperature, self.pending, self.logps = temperature, None, []

    def __call__(self, input_ids, scores):
        if self.pending is not None:  # input_ids[:, -1] was sampled from the previous step
            self.logps.append(token_logprobs(self.pending, input_ids[:, -1]))
        self.pending = scores / self.temperature
        return scores

    def result(self, responses: torch.Tensor) -> torch.Tensor:
        """-> [B, T] for the T generated tokens (the last one's from the pending step)."""
        T = responses.shape[1]
        logps = self.logps[:T]  # (a deferred stop check may have run one step more)
        if len(logps) < T:
            logps.append(token_logprobs(self.pending, responses[:, T - 1]))
        return torch.stack(logps, 1)


class Scorer:
    """Score (prompt, response) pairs with the reward model or the reward function. A reward model
    runs in chunks of --local_rollout_forward_batch_size; a reward function gets the whole batch."""

    def __init__(
        self, args, tokenizer, device, reward_model=None, reward_tokenizer=None, reward_fn=None
    ):
        self.tokenizer, self.device = tokenizer, device
        self.reward_model, self.reward_tokenizer = reward_model, reward_tokenizer
        self.reward_fn, self.chunk = reward_fn, args.local_rollout_forward_batch_size
        config = getattr(getattr(reward_model, "module", reward_model), "config", None)
        normalize = args.normalize_reward and config is not None
        self.mean = float(getattr(config, "reward_mean", 0.0)) if normalize else 0.0
        self.std = float(getattr(config, "reward_std", 1.0)) if normalize else 1.0

    @staticmethod
    def rows(prompts, prompt_mask, responses, response_mask, originals) -> list:
        """-> (dataset prompt, prompt ids, response ids) per sample, padding dropped. `originals`: the
        dataset's prompts (strings or messages), one per row."""
        rows = zip(originals, prompts, prompt_mask, responses, response_mask)
        return [(o, p[pm.bool()].tolist(), r[rm.bool()].tolist()) for o, p, pm, r, rm in rows]

    def texts(self, prompts, prompt_mask, responses, response_mask, originals):
        """-> (prompt texts, completion texts), as the labeller reads them (labeller_texts)."""
        rows = self.rows(prompts, prompt_mask, responses, response_mask, originals)
        texts = [labeller_texts(self.tokenizer, *row) for row in rows]
        return [p for p, _ in texts], [c for _, c in texts]

    @torch.no_grad()
    def __call__(self, prompts, prompt_mask, responses, response_mask, has_eos, originals):
        sequences = (prompts, prompt_mask, responses, response_mask, originals)
        if self.reward_fn is not None:
            prompt_texts, completions = self.texts(*sequences)
            # A labelling error stops every process, not only the one whose samples failed.
            error, scores = None, [0.0] * len(completions)
            try:
                scores = call_reward_fn(self.reward_fn, prompt_texts, completions, has_eos.tolist())
            except DataError as e:
                error = str(e)
            if errors := [e for e in gather_object([error]) if e]:
                raise DataError(errors[0])
            return torch.tensor(scores, device=self.device)
        sequences = (*sequences, has_eos)
        parts = [slice(i, i + self.chunk) for i in range(0, len(prompts), self.chunk)]
        return torch.cat([self.reward_model_scores(*(t[s] for t in sequences)) for s in parts])

    def reward_model_scores(
        self, prompts, prompt_mask, responses, response_mask, originals, has_eos
    ):
        if self.reward_tokenizer is not None:  # another vocabulary: through the labeller's text
            samples = self.rows(prompts, prompt_mask, responses, response_mask, originals)
            finished = has_eos.tolist()
            seqs = [
                reward_model_inputs(self.tokenizer, self.reward_tokenizer, *sample, f)
                for sample, f in zip(samples, finished)
            ]
            input_ids = pad(seqs, self.reward_tokenizer.pad_token_id).to(self.device)
            attention_mask = pad([[1] * len(s) for s in seqs], 0).to(self.device)
        else:  # the policy's vocabulary: the sampled ids
            input_ids = torch.cat([prompts, responses], 1)
            attention_mask = torch.cat([prompt_mask, response_mask], 1)
        scores = score_tokens(self.reward_model, input_ids, attention_mask)
        rows = torch.arange(len(scores), device=self.device)
        scores = scores[rows, last_token_index(attention_mask)].float()
        return (scores - self.mean) / self.std


# ---- shared helpers: identical in every script that has them (tests/test_shared_helpers.py) ----


class DataError(ValueError):
    """Bad input or a run that must stop: reported as one `error:` line, never a traceback."""


def load_split(name: str, config: str | None, split: str) -> Dataset:
    """A hub dataset, or local .json/.jsonl/.parquet file(s); a directory's files are named by split."""
    path, suffixes = Path(name), (".json", ".jsonl", ".parquet")
    local = path.suffix in suffixes or path.exists() or name.startswith((".", "/", "~"))
    if local and not path.exists():
        raise DataError(f"{name}: no such file")
    files = sorted(p for p in path.iterdir() if p.suffix in suffixes) if path.is_dir() else [path]
    if local and (not files or all(f.stat().st_size == 0 for f in files)):
        raise DataError(f"{name}: no data (empty file or no .json/.jsonl/.parquet files)")
    try:  # an unknown id or split, no network, a malformed file: one line, not a traceback
        if local:
            data_files = {f.stem: str(f) for f in files} if path.is_dir() else {"train": name}
            builder = "parquet" if files[0].suffix == ".parquet" else "json"
            ds = load_dataset(builder, data_files=data_files, split=split)
        else:
            ds = load_dataset(name, config, split=split)
    except Exception as e:  # (a malformed file's DatasetGenerationError: the cause says what)
        cause = " ".join(str((local and e.__cause__) or e).split())[:200]
        raise DataError(f"dataset {name}: cannot load split '{split}' ({cause})") from None
    if len(ds) == 0:
        raise DataError(f"{name} split '{split}' is empty")
    return ds


def check_text(value, column: str, row: int, messages_ok: bool = True):
    """A text field is a string or, where chat data is allowed, a list of {role, content} messages."""
    is_message = lambda m: (
        isinstance(m, dict) and all(isinstance(m.get(k), str) for k in ("role", "content"))
    )
    if isinstance(value, str) or (
        messages_ok and isinstance(value, list) and value and all(map(is_message, value))
    ):
        return
    expected = "a string or a list of {role, content} messages" if messages_ok else "a string"
    found = f"{type(value).__name__} {str(value)[:40]!r}"
    raise DataError(f"row {row}, column '{column}': expected {expected}, found {found}")


def split_hh_transcript(chosen: str, rejected: str):
    """HH-RLHF: the prompt is the shared text up to and including the last '\\n\\nAssistant:'."""
    marker = "\n\nAssistant:"
    cut = chosen.rfind(marker)
    if cut < 0:
        raise DataError(f"HH-RLHF transcript without '{marker.strip()}': {chosen[:60]!r}")
    prompt = chosen[: cut + len(marker)]
    if not rejected.startswith(prompt):
        raise DataError(
            f"HH-RLHF pair whose transcripts diverge before the last turn: {prompt[:60]!r}"
        )
    return prompt, chosen[len(prompt) :], rejected[len(prompt) :]


def to_preference(ds: Dataset) -> Dataset:
    """Any preference shape of docs/design.md section 4 -> columns prompt, chosen, rejected (types
    checked per row). SafeRLHF-style rows are converted once, by prepare_data.py."""
    cols = set(ds.column_names)
    if {"response_0", "response_1"} <= cols:
        raise DataError(
            "SafeRLHF-style data (response_0/response_1): turn it into preference pairs first, with "
            "the paper's construction: python prepare_data.py --dataset_name NAME --output pairs.jsonl"
        )
    if {"prompt", "chosen", "rejected"} <= cols:
        ds = ds.select_columns(["prompt", "chosen", "rejected"])
        for i, row in enumerate(ds):
            for c in ("prompt", "chosen", "rejected"):
                check_text(row[c], c, i)
    elif {"chosen", "rejected"} <= cols:
        for i, row in enumerate(ds.select_columns(["chosen", "rejected"])):
            for c in ("chosen", "rejected"):
                check_text(row[c], c, i, messages_ok=False)

        def hh(row):
            prompt, chosen, rejected = split_hh_transcript(row["chosen"], row["rejected"])
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

        ds = ds.map(hh, remove_columns=ds.column_names)
    else:
        raise DataError(
            f"dataset has columns {sorted(cols)}; expected one of: prompt+chosen+rejected, "
            "chosen+rejected (HH-RLHF)"
        )
    if len(ds) == 0:
        raise DataError("no preference pairs in the dataset")
    return ds


def to_prompts(ds: Dataset) -> list:
    """Any prompt source: a `prompt` column (string or messages), a preference shape, or conversations
    (`messages` up to the last assistant turn)."""
    cols = set(ds.column_names)
    if "prompt" in cols and not {"response_0", "response_1"} <= cols:
        for i, prompt in enumerate(ds["prompt"]):
            check_text(prompt, "prompt", i)
        return list(ds["prompt"])
    if "messages" in cols:
        prompts = []
        for i, messages in enumerate(ds["messages"]):
            if isinstance(messages, str):  # check_text accepts a string: messages must be a list
                raise DataError(
                    f"row {i}, column 'messages': expected a list of {{role, content}} messages, "
                    "found str"
                )
            check_text(messages, "messages", i)
            last = max(
                (j for j, m in enumerate(messages) if m["role"] == "assistant"),
                default=len(messages),
            )
            if last == 0:
                raise DataError(
                    f"row {i}, column 'messages': no turn before the first assistant turn"
                )
            prompts.append(messages[:last])
        return prompts
    try:
        return list(to_preference(ds)["prompt"])
    except DataError as e:
        if "expected one of" not in str(e):
            raise
        raise DataError(
            f"dataset has columns {sorted(cols)}; expected prompts: a prompt column, messages, or a "
            "preference shape (prompt+chosen+rejected, chosen+rejected)"
        ) from None


def tokenize_prompts(
    prompts: list, tokenizer, max_length: int, max_prompt_length: int | None, name: str
) -> list:
    """-> list of {prompt, prompt_ids}. Long prompts keep their end (max_prompt_length); a prompt that
    leaves no room for a response within max_length, or is empty, is dropped and counted; a null,
    NaN or number is an error naming the row."""
    out, n_truncated, n_empty, n_no_room = [], 0, 0, 0
    for i, prompt in enumerate(prompts):
        if prompt == "" or prompt == []:
            n_empty += 1
            continue
        check_text(prompt, "prompt", i)
        kept = truncate(encode_prompt(tokenizer, prompt), [], max_length, max_prompt_length)
        if kept is None:
            n_no_room += 1
            continue
        out.append({"prompt": prompt, "prompt_ids": kept[0]})
        n_truncated += kept[2]
    no_room = f"no room for a response within max_length={max_length}"
    print(
        f"{name}: {len(out)} prompts, {n_truncated} truncated, {n_empty} empty dropped, "
        f"{n_no_room} dropped ({no_room})"
    )
    if not out:
        raise DataError(f"{name}: no prompts left ({n_empty} empty, {n_no_room} with {no_room})")
    return out


def render_chat(tokenizer, messages, add_generation_prompt=False) -> str:
    if tokenizer.chat_template is None:
        raise DataError("conversational data needs a tokenizer with a chat template")
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def encode_prompt(tokenizer, prompt) -> list:
    """Prompt token ids: messages via the chat template; a string as is, with the tokenizer's special
    tokens, less an EOS it appends to every text (add_eos_token=True would end prompts in a stop)."""
    if isinstance(prompt, list):
        return tokenizer(
            render_chat(tokenizer, prompt, add_generation_prompt=True), add_special_tokens=False
        ).input_ids
    ids = tokenizer(prompt).input_ids
    eos = tokenizer.eos_token_id
    if len(ids) > 1 and ids[-1] == eos and not prompt.endswith(str(tokenizer.eos_token)):
        ids = ids[:-1]
    return ids


def encode_completion(tokenizer, prompt, completion) -> list:
    """Completion token ids ending in exactly one EOS, where generation stops, so the model learns to stop
    (the EOS trick depends on it). A chat template whose end-of-turn token is the EOS (ChatML:
    '<|im_end|>\\n') already rendered one: cut after it rather than append a second."""
    chat = isinstance(prompt, list)
    before = render_chat(tokenizer, prompt, add_generation_prompt=True) if chat else prompt
    # assistant messages: the text the template adds after the prompt
    if isinstance(completion, list):
        after = render_chat(tokenizer, prompt + completion)
        if not after.startswith(before):
            raise DataError("chat template renders the prompt differently once a response follows")
        completion = after[len(before) :]
    ids = tokenize_after(tokenizer, before, completion)
    eos = tokenizer.eos_token_id
    return ids[: len(ids) - ids[::-1].index(eos)] if eos in ids else ids + [eos]


def tokenize_after(tokenizer, context: str, text: str) -> list:
    """Token ids of `text` as it is tokenized after `context` (both tokenized together, the context's ids
    cut off), as a model reads and writes it. Alone, a SentencePiece text can start differently: a
    legacy Llama tokenizer turns ' Paris' into '▁', '▁Paris'. Alone only if the two merge at the seam."""
    head = tokenizer(context, add_special_tokens=False).input_ids
    both = tokenizer(context + text, add_special_tokens=False).input_ids
    if both[: len(head)] == head:
        return both[len(head) :]
    return tokenizer(text, add_special_tokens=False).input_ids


def truncate(
    prompt_ids: list, completion_ids: list, max_length: int, max_prompt_length: int | None
):
    """Prompts keep their end, completions their start. Returns (prompt, completion, truncated) or None
    when the prompt leaves no room for a completion (the caller drops and counts it)."""
    truncated = False
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids, truncated = prompt_ids[len(prompt_ids) - max_prompt_length :], True
    if len(prompt_ids) >= max_length:
        return None
    if len(prompt_ids) + len(completion_ids) > max_length:
        completion_ids, truncated = completion_ids[: max_length - len(prompt_ids)], True
    return prompt_ids, completion_ids, truncated


def pad(seqs: list, value: int, side: str = "right") -> torch.Tensor:
    """Lists of ints -> one [B, T] long tensor, filled with `value` on `side`."""
    rows = [torch.tensor(list(s), dtype=torch.long) for s in seqs]
    return torch.nn.utils.rnn.pad_sequence(rows, True, value, padding_side=side)


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so left padding does not shift absolute position embeddings."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] without materializing the full log-softmax (logit - logsumexp)."""
    logits = logits.float()
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, from the attention mask (left or right padding, pad == EOS)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask).argmax(-1)


def score_tokens(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head of an AutoModelForSequenceClassification (num_labels=1) at every token: [B, T].
    HF's own pooling finds the last token from pad_token_id, which breaks when pad == EOS, so we keep the
    head's output at every token (a forward hook) and callers pick positions from the attention mask.
    The forward goes through the wrapper: calling the inner module would skip DDP's gradient
    synchronization (each process would train alone) and DeepSpeed's bookkeeping. No hidden states kept."""
    scores = []
    head = getattr(model, "module", model).score  # under a DDP / DeepSpeed wrapper
    hook = head.register_forward_hook(lambda module, inputs, output: scores.append(output))
    try:
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from(attention_mask),
            use_cache=False,
        )
    finally:
        hook.remove()
    return scores[0].squeeze(-1)


def check_model_path(path: str, what: str = "model"):
    """Before anything loads, in one line: a local-looking path that does not exist is a typo, not a
    hub id; a hub id needs the hub, which is probed first (3 s at most) instead of after a minute of
    download retries. With HF_HUB_OFFLINE=1 the load reads the local cache, and fails at once."""
    if Path(path).exists():
        return
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or path.endswith("/"):
        raise DataError(f"{what} {path}: no such directory")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return
    hub = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((hub.hostname, hub.port or 443), timeout=3).close()
    except OSError as e:
        raise DataError(
            f"{what} {path}: not a local directory, and the hub ({hub.hostname}) cannot be reached "
            f"({type(e).__name__}): give a local path, or set HF_HUB_OFFLINE=1 to use the cache"
        ) from None


def load_pretrained(cls, path: str, dtype: torch.dtype, args, **kwargs):
    """from_pretrained with an explicit dtype (transformers 5 otherwise keeps the checkpoint's: a bf16
    checkpoint would train in pure bf16) and the run's --attn_implementation, for trained and frozen
    models alike; a path, hub id or attention kernel that cannot be loaded is one error line."""
    check_model_path(path)
    try:
        return cls.from_pretrained(path, dtype=dtype, trust_remote_code=args.trust_remote_code,
                                   attn_implementation=args.attn_implementation, **kwargs)  # fmt: skip
    except (OSError, ValueError, ImportError) as e:
        raise DataError(
            f"cannot load a model from {path!r}: {str(e).splitlines()[0][:200]}"
        ) from None
    except Exception as e:  # a damaged weights file: safetensors' own error
        cause = " ".join(str(e).split())[:200]
        raise DataError(f"cannot load a model from {path!r}: {type(e).__name__}: {cause}") from None


def load_tokenizer(args):
    path = args.tokenizer_name_or_path or args.model_name_or_path
    check_model_path(path, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    except OSError as e:  # offline hub id, a directory without a tokenizer
        raise DataError(
            f"cannot load a tokenizer from {path!r}: {str(e).splitlines()[0][:200]}"
        ) from None
    if args.chat_template_path:  # a Jinja chat template for a tokenizer that has none (or another)
        if not Path(args.chat_template_path).is_file():
            raise DataError(f"--chat_template_path {args.chat_template_path}: no such file")
        tokenizer.chat_template = Path(args.chat_template_path).read_text()
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; completions must end in EOS")
    if tokenizer.pad_token_id is None:
        # Sequence ends are found from the attention mask, never from pad ids, so EOS-as-pad is safe.
        print(
            "tokenizer has no pad token: using EOS as pad (ends are found from the attention mask)"
        )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def disable_dropout(model: torch.nn.Module):
    """Dropout off in every module and in the config: nn.Dropout modules, and the functional rates that
    attention reads from a float attribute (Llama, Qwen2, GPT-NeoX `attention_dropout`)."""
    for key, value in model.config.to_dict().items():
        if "drop" in key and isinstance(value, float):
            setattr(model.config, key, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout", "attn_dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    return model


def check_finite(value: torch.Tensor, what: str, step: int):
    """docs/design.md section 4: a non-finite loss, score or reward stops the run before it reaches the weights;
    checkpoints already written stay as they are. Call it on a value every process shares (reduced)."""
    if not torch.isfinite(value).all():
        raise DataError(
            f"non-finite {what} at step {step}: stopping; nothing more is saved "
            "(the last checkpoint, if any, is kept)"
        )


def generation_config(
    tokenizer,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> GenerationConfig:
    """Exactly the sampling the log-probabilities assume. Passed to generate() and set on the model, so
    nothing from the checkpoint's generation_config.json (repetition_penalty, no_repeat_ngram_size...)
    leaks into sampling: every other option is set to its neutral value."""
    neutral = dict(  # noqa: C408
        min_new_tokens=0, min_p=None, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
        bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None, forced_bos_token_id=None,
        forced_eos_token_id=None, use_cache=True,
    )  # fmt: skip
    # greedy: the defaults (a greedy config with top_k=0 warns, and save_pretrained refuses it)
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p} if do_sample else {}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        **sampling,
        **neutral,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def describe_run(accelerator, per_device: int, ga: int, unit: str):
    """The run's first line: process count, device, precision and the global batch, so a launch that
    does not do what was meant shows at once. Says so when the launcher asked for more processes than
    run together (`accelerate launch --cpu --num_processes 2` starts one; `srun -n 2 python ...`
    starts two that each run alone) or for a precision the script's --bf16 overrides."""
    n = accelerator.num_processes
    precision = "bf16 autocast" if accelerator.mixed_precision == "bf16" else "fp32"
    kind = accelerator.distributed_type.value
    accelerator.print(
        f"{n} process{'es' * (n > 1)}{f' ({kind})' if kind != 'NO' else ''}, device "
        f"{accelerator.device.type}, {precision}, global batch {per_device * n * ga} {unit} "
        f"({per_device} per device x {n} x {ga} accumulation)"
    )
    asked = [int(os.environ.get("SLURM_NTASKS", "1") or 1)]
    try:  # the launcher's own command line (Linux): accelerate launch ... --num_processes N
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
        if any("accelerate" in a for a in argv[:3]) and "--num_processes" in argv:
            asked.append(int(argv[argv.index("--num_processes") + 1]))
    except (OSError, ValueError, IndexError):
        pass
    if n == 1 and max(asked) > 1:
        print(
            f"warning: the launcher asked for {max(asked)} processes, but this one runs alone "
            "(and so may every other): for several CPU processes use accelerate launch --multi_gpu "
            "with ACCELERATE_USE_CPU=1; on GPUs, accelerate launch --num_processes N"
        )
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher not in ("no", accelerator.mixed_precision):
        accelerator.print(
            f"note: the launcher's mixed_precision {launcher} is not used; this script's precision "
            f"comes from --bf16 ({precision})"
        )


def adamw(accelerator, params, **kwargs) -> torch.optim.AdamW:
    """torch's AdamW, fused (one kernel per parameter group instead of a loop over the parameters; HF
    Trainer's default) on the devices torch 2.13 has the kernel for. Under DeepSpeed, which steps it
    on its own flat fp32 partitions (and refuses any torch optimizer under ZeRO-Offload), torch's
    default: the path DeepSpeed tests. The same update up to float rounding."""
    fused = accelerator.state.deepspeed_plugin is None and accelerator.device.type in (
        "cpu", "cuda", "mps", "xpu", "hpu"
    )  # fmt: skip
    return torch.optim.AdamW(params, fused=True if fused else None, **kwargs)


def check_common_args(args, positive: tuple):
    """The argument mistakes every stage can make, one line each, before anything loads."""
    for name in positive:
        if getattr(args, name) < 1:
            raise DataError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.learning_rate > 0:
        raise DataError(f"--learning_rate must be > 0, got {args.learning_rate}")
    if args.max_prompt_length is not None and args.max_prompt_length < 1:
        raise DataError(
            f"--max_prompt_length must be >= 1 (or unset), got {args.max_prompt_length}"
        )
    if args.save_steps < 0 or not 0 <= args.warmup_ratio <= 1:
        raise DataError("--save_steps must be >= 0 and --warmup_ratio within [0, 1]")
    if args.save_total_limit is not None and args.save_total_limit < 1:
        raise DataError(f"--save_total_limit must be >= 1 (or unset), got {args.save_total_limit}")
    package = {"tensorboard": ["tensorboard", "tensorboardX"], "wandb": ["wandb"]}.get(
        args.report_to, []
    )
    if package and not any(importlib.util.find_spec(p) for p in package):
        raise DataError(
            f"--report_to {args.report_to}: the package is not installed (pip install {package[0]})"
        )
    check_model_path(args.model_name_or_path)


def make_accelerator(args, gradient_accumulation_steps: int) -> Accelerator:
    """bf16 autocast under --bf16; accumulation counted by the script (sync_with_dataloader=False:
    every optimizer step sees exactly ga micro-batches); the seedable sampler, so every process and
    every resume draws the same data order; the tracker of --report_to."""
    return Accelerator(
        mixed_precision="bf16" if args.bf16 else "no",
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=gradient_accumulation_steps, sync_with_dataloader=False
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
    )


def prepare_for_training(accelerator, max_grad_norm: float, *objects):
    """accelerator.prepare, with the two DeepSpeed settings that must agree with the script: it clips
    inside its own step at its config's norm ('auto' would be accelerate's 1.0), and its config's
    gradient_accumulation_steps must be the script's."""
    ga = accelerator.gradient_accumulation_steps
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.deepspeed_config.get("gradient_clipping") == "auto":
        plugin.deepspeed_config["gradient_clipping"] = max_grad_norm
    prepared = accelerator.prepare(*objects)
    if accelerator.gradient_accumulation_steps != ga:
        raise DataError(
            f"the DeepSpeed config sets gradient_accumulation_steps="
            f"{accelerator.gradient_accumulation_steps}, the script derives {ga} from its batch "
            "arguments: set them equal (or 'auto' in the config)"
        )
    return prepared


def optimizer_step(accelerator, loss, parts: list, optimizer, scheduler, max_grad_norm: float):
    """Backward; at the end of an accumulation group, clip (each part of the model its own norm),
    step, advance the schedule, zero the gradients. Under DeepSpeed the step runs inside backward."""
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        for part in parts:
            accelerator.clip_grad_norm_(part.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def checkpoint_or_stop(accelerator, args, step: int, total: int, state, write_extra=None):
    """Every --save_steps steps a checkpoint (not at the last: the model itself is saved then); after
    a SIGTERM or SIGINT (StopSignal) a checkpoint of this step, then KeyboardInterrupt, which ends
    the run with the line that says how to resume. `state` None: no checkpoints (DPO-Iter's rounds)."""
    stop = STOP.requested(accelerator) and step < total
    due = state is not None and args.save_steps > 0 and (step % args.save_steps == 0 or stop)
    if due and step < total:
        save_checkpoint(
            accelerator, args.output_dir, step, state, write_extra, args.save_total_limit
        )
    if stop:
        raise KeyboardInterrupt


def lr_schedule(optimizer, name: str, warmup_ratio: float, total_steps: int):
    """The learning rate of optimizer step s = 0 .. total_steps - 1 as a multiple of --learning_rate: a
    linear warm-up over ceil(warmup_ratio * total_steps) steps, then constant, linear or cosine decay.
    Unlike transformers' get_scheduler, no step runs at lr 0 (its warm-up starts at 0): the warm-up
    starts at 1 / (warmup + 1) and the decay would reach 0 one step after the last, so a 1-step run
    still learns. Without warm-up, linear and cosine equal get_scheduler's."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        progress = (s - warmup) / max(total_steps - warmup, 1)  # in [0, 1) for every step run
        decay = {"linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}
        return decay.get(name, 1.0)  # constant

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def keep_rows_up_to(path: Path, step: int, iteration: float = math.inf):
    """On resume from step N: drop the rows of a .jsonl log (metrics, samples) that the interrupted
    run wrote after N, since the resumed run writes them again; with `iteration` (DPO-Iter's last
    complete one), also the rows of later iterations (the next one logs its sampling at step N). A
    last line cut short by a kill is dropped. Rewritten under a temporary name."""
    if path.exists():
        rows = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the last line of a run killed while appending it
                continue
            if row["step"] <= step and row.get("iteration", 0) <= iteration:
                rows.append(line)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(r + "\n" for r in rows))
        tmp.replace(path)


def start_tracker(accelerator, args, stage: str, resuming: bool):
    """The tracker's run (main process): its project is --project, else the tracker's own environment
    (WANDB_PROJECT; wandb reads WANDB_ENTITY and WANDB_NAME itself), else the stage's name; its name
    --run_name. A tracker that cannot start (wandb without an API key) is one error line, and a new
    run's args.json is removed so that it does not block the retry."""
    if args.report_to == "none":
        return
    env_project = os.environ.get("WANDB_PROJECT") if args.report_to == "wandb" else None
    project = args.project or env_project or stage
    if args.report_to == "tensorboard":  # its run is a folder: output_dir/<name>
        project = args.run_name or project
    init = {"wandb": {"name": args.run_name}} if args.run_name else {}
    try:
        accelerator.init_trackers(project, config=asdict(args), init_kwargs=init)
    except Exception as e:
        if not resuming:
            (Path(args.output_dir) / "args.json").unlink(missing_ok=True)
        cause = " ".join(str(e).split())[:200]
        raise DataError(f"--report_to {args.report_to}: cannot start ({type(e).__name__}: {cause})")


def end_training(accelerator):
    """accelerator.end_training() (trackers closed, process group destroyed) once gloo has let go of the
    last collectives. Its worker thread frees their tensors under the GIL, which destroy_process_group
    holds while it joins that thread: destroyed at once after a collective, a 2-process CPU run hung at
    exit about 1 launch in 30. The sleep releases the GIL for it."""
    accelerator.wait_for_everyone()
    time.sleep(0.1)
    accelerator.end_training()


class MetricsLog:
    """metrics.jsonl: one JSON object per logging step, written by the main process, flushed as written.
    On resume from step N, rows after N (written by the run that was interrupted) are dropped first."""

    def __init__(self, accelerator, output_dir, resume_step: int = 0):
        self.accelerator = accelerator
        self.file = None
        if accelerator.is_main_process:
            path = Path(output_dir) / "metrics.jsonl"
            if resume_step:
                keep_rows_up_to(path, resume_step)
            self.file = open(path, "a" if resume_step else "w")

    def log(self, metrics: dict, step: int):
        metrics = {k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}
        self.accelerator.log(metrics, step=step)
        if self.file:
            try:
                self.file.write(json.dumps({"step": step, **metrics}) + "\n")
                self.file.flush()
            except OSError as e:  # a full disk
                raise DataError(f"cannot write {self.file.name} ({write_error(e, self.file.name)})")


def write_error(e: Exception, path) -> str:
    """A failed write in one line, with the space left on the disk it wrote to: a full disk is the
    usual cause, and torch's message for it does not say so."""
    folder = Path(path).absolute()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free / 2**20
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}; {free:.0f} MiB free there"


RESUME_MAY_CHANGE = {  # the step budget and logging; a moved or copied run directory still resumes
    "max_steps", "num_train_epochs", "num_iterations", "total_episodes", "iterations", "logging_steps",
    "eval_steps", "save_steps", "save_total_limit", "resume_from_checkpoint", "overwrite_output_dir",
    "report_to", "project", "run_name", "output_dir",
}  # fmt: skip


def on_main(accelerator, fn, *fn_args):
    """Run fn on the main process; every process raises the same DataError if it failed (no hang)."""
    error = None
    if accelerator.is_main_process:
        try:
            fn(*fn_args)
        except DataError as e:
            error = str(e)
    error = broadcast_object_list([error])[0]
    if error:
        raise DataError(error)


RUN_LOCK = []  # the open lock file of the run this process holds (lock_output_dir)


def lock_output_dir(out: Path):
    """One run at a time in output_dir: an flock on output_dir/.lock, held until this process ends (the
    OS releases it however the process dies, so a crash never leaves it stuck) or main() runs again."""
    while RUN_LOCK:  # main() called again in this process: its previous run has ended
        RUN_LOCK.pop().close()
    RUN_LOCK.append(lock := open(out / ".lock", "a+"))
    try:
        import fcntl  # POSIX only

        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another run"
        raise DataError(
            f"{out} is in use by {holder}: wait for it to end, or use another --output_dir"
        ) from None
    except (ImportError, OSError) as e:  # Windows, or a file system without locks
        print(f"warning: cannot lock {lock.name} ({e}); a second run on {out} would not be refused")
    else:
        lock.truncate(0)
        lock.write(f"the run of pid {os.getpid()} on {os.uname().nodename}\n")
        lock.flush()


def prepare_output_dir(args, resume_from: Path | None, num_processes: int, train: list):
    """Refuse to mix runs: a directory that holds a run needs --overwrite_output_dir (which clears it) or a
    resume; a resume must use the saved arguments, apart from the step budget and logging, and what
    run.json records: the process count (it sets the global batch and the rows each step reads) and a
    hash of the tokenized training rows (data edited under the same path). Main process."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"output_dir {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    lock_output_dir(out)
    saved, run_file, digest = out / "args.json", out / "run.json", hashlib.sha256()
    for row in train:  # ~1 s per 10M token ids
        digest.update(json.dumps(row, sort_keys=True).encode())
    run = {"num_processes": num_processes, "train_data_sha256": digest.hexdigest()}
    if resume_from is not None and run_file.exists():
        old = {**run, **json.loads(run_file.read_text())}  # (a key it lacks is not checked)
        new_run = "start a new run with --overwrite_output_dir or another --output_dir"
        if (was := old["num_processes"]) != num_processes:
            raise DataError(
                f"the run in {out} ran on {was} process{'es' * (was > 1)} and this one on "
                f"{num_processes}: the global batch and the rows each step reads would change; resume "
                f"it on {was} (accelerate launch --num_processes {was}), or {new_run}"
            )
        if old["train_data_sha256"] != run["train_data_sha256"]:
            raise DataError(
                f"the training data differ from the run's in {out} (their tokenized rows' sha256 is "
                f"{run['train_data_sha256'][:12]}, {run_file.name} records "
                f"{old['train_data_sha256'][:12]}): restore them, or {new_run}"
            )
    if resume_from is not None and saved.exists():
        old, new = json.loads(saved.read_text()), asdict(args)
        differ = sorted(k for k in new if k not in RESUME_MAY_CHANGE and old.get(k) != new[k])
        if differ:
            raise DataError(f"resume with arguments that differ from {saved}: {', '.join(differ)}")
    elif resume_from is None and saved.exists():
        if not args.overwrite_output_dir:
            raise DataError(
                f"{out} already holds a run; pass --overwrite_output_dir, "
                "--resume_from_checkpoint latest, or another --output_dir"
            )
        old_outputs = ("checkpoints", "metrics.jsonl", "samples.jsonl", "best")
        for path in [*(out / name for name in old_outputs), *out.glob("iter_*")]:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    saved.write_text(json.dumps(asdict(args), indent=2))
    run_file.write_text(json.dumps(run, indent=2))


def write_model_dir(output_dir, write):
    """write(folder) saves a model directory: into output_dir/model.tmp, whose files then move into
    output_dir, the old weights out first and the new ones in last. At every moment output_dir holds
    no weights or a complete model, so a run killed while saving never leaves a half-written one that
    from_pretrained would load. A failed write (a full disk) removes the partial files and stops the
    run with one line; output_dir keeps what it had. Main process."""
    out = Path(output_dir)
    tmp = out / "model.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a run killed while saving
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except Exception as e:  # a full disk: torch, safetensors and open() raise different errors
        shutil.rmtree(tmp)
        raise DataError(f"cannot save the model in {out} ({write_error(e, out)})") from None
    weights = lambda p: ".safetensors" in p.name  # model.safetensors, or its shards and their index
    for old in filter(weights, out.iterdir()):
        old.unlink()
    for new in sorted(tmp.iterdir(), key=lambda p: (weights(p), p.name.endswith(".json"))):
        new.replace(out / new.name)
    tmp.rmdir()


def save_checkpoint(
    accelerator,
    output_dir,
    step: int,
    state: dict,
    write_extra=None,
    total_limit: int | None = None,
):
    """output_dir/checkpoints/step_N: accelerate's model, optimizer and RNG state, our own `state`
    (step, scheduler, running statistics) as JSON in step.json, never pickled, and what
    write_extra(folder) adds (every process calls it). All of it is written under a temporary name
    that is renamed last, so a run killed while saving never leaves a half-written checkpoint that
    'latest' would pick. A failed write (a full disk) removes the partial checkpoint and stops the run
    with one line; the checkpoints before it stay. Then checkpoints beyond total_limit are deleted."""
    final = Path(output_dir) / "checkpoints" / f"step_{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(str(tmp))
        if write_extra is not None:
            write_extra(tmp)
        if accelerator.is_main_process:
            (tmp / "step.json").write_text(json.dumps({"step": step, **state}))
    except Exception as e:  # a full disk: torch, safetensors and open() raise different errors
        error = write_error(e, output_dir)
    # every process has written its part (RNG state) or failed, before the rename
    error = next((e for e in gather_object([error]) if e), None)
    if error:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"cannot write checkpoint {final} ({error}); removed it, earlier ones stay")
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        prune_checkpoints(output_dir, total_limit, step)
    accelerator.wait_for_everyone()


def full_state_dict(accelerator, model) -> dict:
    """Gathered under ZeRO-3; without torch.compile's `_orig_mod.` (accelerate's --dynamo_backend)."""
    state = accelerator.get_state_dict(model)  # None but on the main process under ZeRO-3
    return None if state is None else {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def checkpoints_open_as_models(accelerator, tokenizer, parts):
    """Each checkpoint folder also opens with from_pretrained, as TRL's checkpoint-N does: the model's
    weights are written there by save_pretrained (config.json, model.safetensors under the unwrapped
    model's names, tied copies once) in place of accelerate's own weights file, so nothing is stored
    twice, and a resume reads them back from there. parts(unwrapped model) -> {subfolder: (state-dict
    prefix, PreTrainedModel)}. Under DeepSpeed the engine's own files stay (a resume needs them) and the
    save_pretrained copy comes on top: twice the weights on disk there."""
    plain = lambda m: accelerator.unwrap_model(m, keep_torch_compile=False)

    def save(models, weights, folder):
        weights.clear()  # accelerate writes no weights file of its own
        for model in models:
            state = full_state_dict(accelerator, model)
            for sub, (prefix, part) in parts(plain(model)).items():
                if accelerator.is_main_process:
                    own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                    part.save_pretrained(
                        Path(folder) / sub, state_dict=own, safe_serialization=True
                    )
        if accelerator.is_main_process:
            tokenizer.save_pretrained(folder)

    def load(models, folder):
        for model in models:
            for sub, (_, part) in parts(plain(model)).items():
                files = sorted((Path(folder) / sub).glob("model*.safetensors"))
                if not files:
                    raise FileNotFoundError(f"no model*.safetensors in {Path(folder) / sub}")
                state = {k: v for f in files for k, v in load_file(str(f)).items()}
                missing, unexpected = part.load_state_dict(state, strict=False)
                own = part.state_dict()
                loaded = {own[k].data_ptr() for k in state if k in own}
                wrong = unexpected + [k for k in missing if own[k].data_ptr() not in loaded]
                if wrong:  # (a missing key that shares storage with a loaded one is a tied copy)
                    raise ValueError(
                        f"weights in {Path(folder) / sub} do not fit the model: {wrong[:3]}"
                    )
        models.clear()  # loaded here, not by accelerate

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def prune_checkpoints(output_dir, total_limit: int | None, step: int):
    """--save_total_limit: once step_<step> is complete, delete the oldest complete checkpoints below it
    until total_limit remain. The newest (what 'latest' resumes) is never touched, and each deletion
    removes step.json first, so a deletion cut short never leaves a folder that looks complete."""
    if total_limit is None:
        return
    folder = Path(output_dir) / "checkpoints"
    older = sorted(int(p.name[5:]) for p in folder.glob("step_*") if p.name[5:].isdigit())
    older = [s for s in older if s < step and (folder / f"step_{s}" / "step.json").exists()]
    for s in older[: max(0, len(older) - (total_limit - 1))]:
        (folder / f"step_{s}" / "step.json").unlink()
        shutil.rmtree(folder / f"step_{s}")


def find_checkpoint(accelerator, output_dir, resume_from_checkpoint: str | None) -> Path | None:
    """None, 'latest' (the newest complete output_dir/checkpoints/step_N) or a path to a checkpoint.
    Every save writes step.json before its rename: 'latest' skips a step_N without one (deleted since)
    and says so; a step.json that does not parse stops the run with one line."""
    if resume_from_checkpoint is None:
        return None
    path = Path(resume_from_checkpoint)
    if resume_from_checkpoint == "latest":
        folder = Path(output_dir) / "checkpoints"
        steps = sorted(int(p.name[5:]) for p in folder.glob("step_*") if p.name[5:].isdigit())
        for path in [folder / f"step_{s}" for s in reversed(steps)]:
            if (path / "step.json").exists():
                break
            accelerator.print(f"warning: skipping {path}: no step.json (damaged)")
        else:
            raise DataError(f"--resume_from_checkpoint latest: no checkpoint in {folder}")
    if not (path / "step.json").exists():
        raise DataError(f"{path}: not a complete checkpoint (no step.json)")
    try:  # read before the models load (DPO trims its metrics with it)
        int(json.loads((path / "step.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        cause = f"step.json: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        raise DataError(f"{path}: cannot resume from this checkpoint ({cause})") from None
    return path


def load_checkpoint(accelerator, path: Path, restore=None) -> dict:
    """Restore accelerate's state from a checkpoint, then our own: restore(state) with step.json's
    contents (it may read files beside it). -> that state. A damaged checkpoint (a truncated or
    garbled file) stops the run with one line that names it and the part that failed."""
    part = "step.json"
    try:
        state = json.loads((path / part).read_text())
        part = f"random_states_{accelerator.process_index}.pkl"
        if (path / part).exists():  # accelerate would skip an unreadable one without a word
            load_weights_only(path / part)
        part = "accelerate's model and optimizer state"
        accelerator.load_state(str(path))
        part = "our own state"
        if restore is not None:
            restore(state)
    except Exception as e:  # one line, nothing changed on disk
        cause = " ".join(str(e).split())[:200]  # (accelerate's messages span several lines)
        raise DataError(
            f"{path}: cannot resume from this checkpoint ({part}: {type(e).__name__}: {cause}); "
            "delete it to resume from an earlier one"
        ) from None
    accelerator.print(f"resumed from {path} at step {state['step']}")
    return state


def zero3_gathered(accelerator, params, modifier_rank=None):
    """Under ZeRO-3, the full tensors of `params` inside the block (one gather, not one per use)."""
    plugin = accelerator.state.deepspeed_plugin if accelerator is not None else None
    if plugin is None or plugin.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed  # only needed (and only importable) under DeepSpeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)


def truncate_after_eos(responses: torch.Tensor, eos_id: int, pad_id: int):
    """Keep each response up to and including its first EOS; replace what follows with pad.
    -> (responses, mask [B, T] long, has_eos [B] bool). A response without EOS keeps all its tokens."""
    is_eos = responses == eos_id
    has_eos = is_eos.any(-1)
    T = responses.shape[1]
    last = torch.full_like(has_eos, T - 1, dtype=torch.long)
    end = torch.where(has_eos, is_eos.long().argmax(-1), last)
    mask = torch.arange(T, device=responses.device)[None, :] <= end[:, None]
    return responses.masked_fill(~mask, pad_id), mask.long(), has_eos


def prepare_frozen(accelerator, model):
    """Frozen models (reference, reward): eval mode, no gradients, no optimizer, on the device. Under
    ZeRO-3, from_pretrained already partitioned them (the Accelerator installs DeepSpeed's config), so
    they get an inference engine of their own, which gathers each layer's weights in forward."""
    model = disable_dropout(model).eval().requires_grad_(False)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        return model.to(accelerator.device)
    import deepspeed  # only needed (and only importable) under DeepSpeed

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": next(model.parameters()).dtype == torch.bfloat16},
    }
    engine = deepspeed.initialize(model=model, config=config)[0]
    engine.eval()  # (returns None, unlike nn.Module.eval)
    return engine


def check_reward_model(path: str, trust_remote_code: bool):
    """Before anything loads: the path must hold a trained reward model (a *ForSequenceClassification
    with one output, as reward_model.py saves), not e.g. the SFT model, whose missing `score` head
    transformers would silently initialize at random."""
    check_model_path(path, "reward model")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise DataError(
            f"cannot load a reward model from {path!r}: {str(e).splitlines()[0][:200]}"
        ) from None
    architectures = config.architectures or []
    classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    if not classifier or config.num_labels != 1:
        raise DataError(
            f"{path} is not a reward model (architectures {architectures}, num_labels "
            f"{config.num_labels}); train one with reward_model.py"
        )


def load_reward_fn(spec: str):
    """'path/to/file.py:function' -> the function, loaded with importlib (it runs that file's code)."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise DataError(f"--reward_fn {spec!r}: expected 'path/to/file.py:function'")
    if not Path(path).is_file():
        raise DataError(f"--reward_fn {spec!r}: no such file {path}")
    module_spec = importlib.util.spec_from_file_location(f"reward_fn_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # a broken file is bad input, reported in one line
        raise DataError(
            f"--reward_fn {spec!r}: cannot import {path} ({type(e).__name__}: {e})"
        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise DataError(f"--reward_fn {spec!r}: {path} has no function {name!r}")
    return fn


def call_reward_fn(fn, prompts: list, completions: list, finished: list) -> list:
    """fn(prompts, completions) -> one number per completion. A function that takes a `finished` keyword
    also gets, per completion, whether it ended in EOS (completions are decoded without special tokens,
    so the text alone cannot tell a truncated answer from a finished one). A function that raises, or
    returns a wrong shape or a non-finite score, stops the run in one line; checkpoints stay."""
    kwargs = {"finished": finished} if "finished" in inspect.signature(fn).parameters else {}
    keep = "stopping; the last checkpoint is kept (fix it, then --resume_from_checkpoint latest)"
    try:
        scores = fn(prompts, completions, **kwargs)
    except Exception as e:  # the function's own error, where it was raised, not a traceback
        where = traceback.extract_tb(e.__traceback__)[-1]
        message = " ".join(str(e).split())[:200]
        raise DataError(
            f"--reward_fn raised {type(e).__name__} at {Path(where.filename).name}:{where.lineno} "
            f"({message}); {keep}"
        ) from None
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise DataError(
            f"--reward_fn must return a list of numbers; it returned {type(scores).__name__}"
        ) from None
    if len(scores) != len(completions):
        raise DataError(
            f"--reward_fn returned {len(scores)} scores for {len(completions)} completions"
        )
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise DataError(
            f"--reward_fn returned a non-finite score ({scores[bad[0]]}) for {len(bad)} of "
            f"{len(scores)} completions, e.g. {completions[bad[0]][:40]!r}; {keep}"
        )
    return scores


def decode_response(tokenizer, prompt_ids: list, response_ids: list) -> str:
    """A response's text as it reads after its prompt (special tokens dropped): decoded with the prompt,
    then the prompt's text cut off. Decoded alone, a SentencePiece response loses its leading space
    ('▁world' -> 'world'), and a reward function or another vocabulary would see 'helloworld'."""
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    text = tokenizer.decode(prompt_ids + response_ids, skip_special_tokens=True)
    if text.startswith(prompt):
        return text[len(prompt) :]
    return tokenizer.decode(response_ids, skip_special_tokens=True)


def same_vocab(tokenizer_a, tokenizer_b) -> bool:
    return tokenizer_a.get_vocab() == tokenizer_b.get_vocab()


def load_reward_tokenizer(args, tokenizer):
    """The reward model's own tokenizer when its vocabulary differs from the policy's (responses are
    then decoded and re-tokenized for it, reward_model_inputs); None when it shares the policy's or
    has none."""
    name = args.reward_model_name_or_path
    if not name:
        return None
    try:
        reward_tokenizer = AutoTokenizer.from_pretrained(
            name, trust_remote_code=args.trust_remote_code
        )
    except (OSError, ValueError):
        print("reward model has no tokenizer of its own: assuming the policy's")
        return None
    if same_vocab(reward_tokenizer, tokenizer):
        return None
    if reward_tokenizer.eos_token_id is None:
        raise DataError(
            f"{name}: its tokenizer differs from the policy's and has no EOS token, so responses "
            "cannot be re-tokenized for it"
        )
    if reward_tokenizer.pad_token_id is None:
        reward_tokenizer.pad_token = reward_tokenizer.eos_token
    print(
        "reward model's tokenizer differs from the policy's: responses are decoded and re-tokenized"
    )
    return reward_tokenizer


def labeller_texts(tokenizer, prompt, prompt_ids: list, response_ids: list) -> tuple:
    """What a labeller reads, the same in ppo.py and dpo.py's DPO-Iter: --reward_fn gets these texts,
    samples.jsonl and pairs.jsonl record them, a reward model with another vocabulary re-tokenizes
    them (reward_model_inputs). The prompt as the dataset gives it (before max_prompt_length
    truncation), messages rendered by the policy's chat template with its generation prompt: the text
    the policy continued. The completion as it reads after that prompt, special tokens dropped
    (decode_response): an EOS is not in the text, call_reward_fn's `finished` tells.
    -> (prompt text, completion text)"""
    if isinstance(prompt, list):
        prompt = render_chat(tokenizer, prompt, add_generation_prompt=True)
    return prompt, decode_response(tokenizer, prompt_ids, response_ids)


def reward_model_inputs(tokenizer, rm_tokenizer, prompt, prompt_ids, response_ids, finished: bool):
    """A reward model's token ids for a prompt and a sampled response. rm_tokenizer None (the policy's
    vocabulary, load_reward_tokenizer): the ids as sampled. Another vocabulary: the labeller_texts in
    the reward model's tokens, messages in its own chat template where it has one (else as the
    labeller reads them); the completion tokenized after its prompt (tokenize_after: alone, a legacy
    SentencePiece text would start with an extra '▁'). A finished response ends in exactly one EOS
    (encode_completion: with the template's end of turn), an unfinished one in neither (an open turn)."""
    if rm_tokenizer is None:
        return prompt_ids + response_ids
    text, completion = labeller_texts(tokenizer, prompt, prompt_ids, response_ids)
    chat = isinstance(prompt, list) and rm_tokenizer.chat_template is not None
    prompt = prompt if chat else text
    ids = encode_prompt(rm_tokenizer, prompt)
    if finished:
        turn = [{"role": "assistant", "content": completion}] if chat else completion
        return ids + encode_completion(rm_tokenizer, prompt, turn)
    before = render_chat(rm_tokenizer, prompt, add_generation_prompt=True) if chat else prompt
    return ids + tokenize_after(rm_tokenizer, before, completion)


def apply_missing_eos_penalty(
    scores: torch.Tensor, finished: torch.Tensor, penalty: float | None
) -> torch.Tensor:
    """Tulu 2.5 App. F, the EOS trick: a response that did not end in EOS within the token budget gets
    `penalty` as its score instead of the labeller's (None: no penalty)."""
    if penalty is None:
        return scores
    return torch.where(finished.bool(), scores, torch.full_like(scores, penalty))


class StopSignal:
    """SIGTERM (how SLURM and Kubernetes preempt a job) and SIGINT (Ctrl-C), once __main__ installs
    it. Outside a training loop (loading, DPO-Iter's sampling) a signal stops the run at once, as
    KeyboardInterrupt: nothing is being written. Once a loop sets `deferred`, a signal is only
    recorded, and the loop asks `requested()` at the end of each step, after its log and evaluation:
    it writes a checkpoint of that step (when --save_steps > 0) and stops, so no step and no write is
    cut in half. The answer is the same on every process (accelerate's trigger, reduced across them),
    so all stop at the same step. A second signal, a second or more after the first, stops at once
    (sooner, it is the copy a launcher such as torchrun forwards of the one its processes got)."""

    def __init__(self):
        self.first, self.deferred = None, False  # when the first signal came

    def install(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        now = time.monotonic()
        if not self.deferred or (self.first is not None and now > self.first + 1):
            raise KeyboardInterrupt
        self.first = self.first or now

    def requested(self, accelerator) -> bool:
        """Collective: every process calls it at the same point."""
        if self.first is not None:
            accelerator.set_trigger()
        return accelerator.check_trigger()


STOP = StopSignal()


if __name__ == "__main__":
    STOP.install()  # SIGTERM and SIGINT stop at the end of a step (StopSignal)
    try:
        main(tyro.cli(Args))
    except (DataError, KeyboardInterrupt) as e:
        hint = "continue from the last checkpoint with --resume_from_checkpoint latest"
        line = f"error: {e}" if isinstance(e, DataError) else f"interrupted: {hint}"
        tqdm.write(line, file=sys.stderr)  # on a line of its own, under a progress bar
        sys.exit(1)
