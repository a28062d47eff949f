"""Direct Preference Optimization (DPO), IPO, and iterative DPO (DPO-Iter) on preference pairs.

DPO trains the policy on preference pairs directly, with no reward model and no sampling (Xu et al.
2024, Sec. 3, Eq. 7): the implicit reward of a response is beta * log(pi_theta(y|x) / pi_ref(y|x))
(Eq. 6), and the loss is the Bradley-Terry likelihood of the preferred response under that reward.
Variants: IPO (a squared loss that does not push margins to infinity) and conservative DPO (sigmoid
with --label_smoothing, for noisy labels). DPO-Iter (Sec. 4.3, Table 2) fixes DPO's distribution
shift: each iteration samples responses from the current policy, labels them with a reward model or a
reward function, trains DPO on those pairs, and makes the trained policy the next iteration's reference.

    python dpo.py --model_name_or_path path/to/sft --dataset_name pairs.jsonl --output_dir outputs/dpo
    python dpo.py --model_name_or_path path/to/sft --dataset_name prompts.jsonl --iterations 3 \
        --reward_model_name_or_path path/to/reward_model --missing_eos_penalty -1.0
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml dpo.py ...

Beyond the paper (docs/dpo.md): DPO-Iter pairs the best with the worst of k samples (the paper only
says "label with a reward model"); IPO uses summed, not length-averaged, log-probabilities; Sec. 6's
"use the dataset's correct solution as y_w when no sample is correct" is not implemented.

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
import shutil
import signal
import socket
import sys
import time
import traceback
import urllib.parse
from dataclasses import asdict, dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
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
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
)


@dataclass
class Args:
    """DPO / IPO / conservative DPO on preference pairs, or DPO-Iter (sample, label with a reward model or
    function, train, repeat) on prompts.

    Offline example: python dpo.py --model_name_or_path path/to/sft --dataset_name pairs.jsonl --output_dir outputs/dpo
    """

    # ---- model and data ----
    model_name_or_path: str = "EleutherAI/pythia-160m"
    """hub id or local directory of the policy to train (usually an SFT model)"""
    ref_model_name_or_path: str | None = None
    """reference model pi_ref (defaults to the initial policy, loaded again and frozen)"""
    tokenizer_name_or_path: str | None = None
    """tokenizer to use (defaults to model_name_or_path)"""
    chat_template_path: str | None = None
    """a Jinja chat template file for a tokenizer without one (or to replace its own); saved with it"""
    trust_remote_code: bool = False
    """allow model/tokenizer code from the hub to run (opt-in)"""
    attn_implementation: str | None = None
    """attention kernel of every model loaded: eager, sdpa, flash_attention_2, ... (None: transformers')"""
    dataset_name: str = "trl-lib/ultrafeedback_binarized"
    """hub id, or a local .json/.jsonl/.parquet file or a directory of them: preference pairs (or, for DPO-Iter, any prompt source)"""
    dataset_config: str | None = None
    """hub dataset configuration name"""
    train_split: str = "train"
    """split to train on; slicing works, e.g. 'train[:90%]'"""
    eval_split: str | None = None
    """split for the eval/ metrics, e.g. 'test' or 'train[90%:]' (None: no evaluation)"""
    max_length: int = 512
    """maximum tokens of prompt + response"""
    max_prompt_length: int | None = None
    """prompts longer than this keep their last tokens (None: prompts are not truncated)"""
    # ---- DPO loss ----
    beta: float = 0.1
    """strength of the implicit KL penalty towards the reference (paper Appendix A.1: 0.1)"""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO (Eq. 7), with --label_smoothing conservative DPO; ipo: (h - 1/(2 beta))^2 on SUMMED log-probs (TRL length-averages; beyond the paper, which does not use IPO)"""
    label_smoothing: float = 0.0
    """sigmoid only: assumed fraction of flipped preference labels, in [0, 0.5) (conservative DPO)"""
    precompute_ref_logps: bool = False
    """compute reference log-probs once before the policy loads, so no reference model stays in memory"""
    eval_only: bool = False
    """evaluate the policy against its reference on eval_split, write the eval/ metrics, and stop"""
    eval_on_start: bool = True
    """also evaluate before the first step (the baseline: policy = reference, every margin 0; DPO-Iter: before iteration 1)"""
    # ---- DPO-Iter (paper Sec. 4.3) ----
    iterations: int = 1
    """DPO-Iter rounds of sample -> label -> train (> 1 needs a reward model or a reward function; a resume may raise it)"""
    reward_model_name_or_path: str | None = None
    """reward model (a reward_model.py checkpoint) that labels sampled responses: turns on DPO-Iter"""
    reward_fn: str | None = None
    """'path/to/file.py:function', (prompts, completions[, finished]) -> list[float], instead of a reward model"""
    samples_per_prompt: int = 4
    """responses sampled per prompt; the best and the worst form a pair, ties are skipped (best-vs-worst of k is our choice, beyond the paper)"""
    missing_eos_penalty: float | None = None
    """score of a sampled response that did not end in EOS within max_new_tokens, replacing the labeller's (as in ppo.py; None: no penalty)"""
    generation_batch_size: int = 16
    """prompts per generate() call on each device"""
    max_new_tokens: int = 64
    """longest sampled response"""
    temperature: float = 1.0
    """sampling temperature (paper Appendix A: 1.0)"""
    top_k: int = 200
    """sample from the k most likely tokens (paper Appendix A: 200; 0 disables)"""
    top_p: float = 1.0
    """nucleus sampling threshold (1.0 disables)"""
    # ---- optimization ----
    seed: int = 1
    """random seed (data order, sampling)"""
    learning_rate: float = 1e-6
    """peak learning rate of AdamW (paper Appendix A.1: 1e-6)"""
    lr_scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    """learning-rate schedule after warmup"""
    warmup_ratio: float = 0.1
    """fraction of the optimizer steps spent warming up linearly"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    num_train_epochs: float = 1.0
    """passes over the training pairs (per DPO-Iter iteration)"""
    max_steps: int = -1
    """optimizer steps (per DPO-Iter iteration); overrides num_train_epochs when > 0"""
    per_device_train_batch_size: int = 8
    """preference pairs per device per micro-batch"""
    per_device_eval_batch_size: int = 8
    """preference pairs per device per eval batch (and per reference-log-prob or reward batch)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    bf16: bool = False
    """bfloat16 mixed precision (the policy's weights stay float32, and so does a reference that is its own checkpoint; another reference and the reward model load in bf16)"""
    gradient_checkpointing: bool = False
    """trade compute for memory by recomputing activations"""
    # ---- logging, evaluation, saving ----
    output_dir: str = "outputs/dpo"
    """where the model, args.json, metrics.jsonl, checkpoints/ and DPO-Iter's iter_K/ go"""
    overwrite_output_dir: bool = False
    """replace a previous run in output_dir (its checkpoints, metrics and model)"""
    logging_steps: int = 10
    """log train metrics every this many optimizer steps"""
    eval_steps: int = 100
    """evaluate every this many optimizer steps (and at the end)"""
    save_steps: int = 500
    """write a resumable checkpoint every this many optimizer steps (0: never; DPO-Iter saves iter_K instead)"""
    save_total_limit: int | None = None
    """keep only the newest N checkpoints, deleting older ones after each save (PPO's best/ is apart)"""
    resume_from_checkpoint: str | None = None
    """'latest' or a path to output_dir/checkpoints/step_N (DPO-Iter: 'latest' restarts after the last saved iter_K, also to extend a finished run with more --iterations)"""
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    """experiment tracker (its package must be installed)"""
    project: str | None = None
    """tracker project (default: $WANDB_PROJECT for wandb, else the stage's name)"""
    run_name: str | None = None
    """tracker run name (default: wandb's $WANDB_NAME or its own; tensorboard: the project)"""


# ---- the DPO loss (Eq. 6-7) ----


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
):
    """Per-pair losses and the implicit rewards of chosen and rejected responses (all [B]).

    Eq. 6: the reward a policy implies is r(x, y) = beta * log(pi_theta(y|x) / pi_ref(y|x)) + C(x).
    Eq. 7: DPO is the Bradley-Terry loss of that reward, -log sigmoid(beta * h), where
    h = log(pi_theta(y_w)/pi_ref(y_w)) - log(pi_theta(y_l)/pi_ref(y_l)).
    label_smoothing eps > 0 is conservative DPO: a fraction eps of the labels is assumed flipped,
    -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    ipo: (h - 1/(2 beta))^2 regresses the margin to a finite target instead of pushing it to
    infinity. Here h sums the response's token log-probs (TRL divides each side by its length, so
    the same beta is a different strength there): the target 1/(2 beta) is per sequence.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":  # Eq. 7; eps > 0: conservative DPO
        eps = label_smoothing
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    # Eq. 6: the implicit rewards, for logging only (no gradient flows through them).
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor):
    """log pi(y|x) = the sum of the completion tokens' log-probabilities (prompt and padding count
    nothing). logits[:, t] predicts input_ids[:, t + 1], hence the shift. -> [B]"""
    logps = token_logprobs(logits[:, :-1], input_ids[:, 1:])
    # Summed in float64: a float32 sum's rounding depends on the padded width, which differs between
    # batchings (and logits_to_keep), and step-0 margins would no longer be exactly 0.
    return (logps.double() * completion_mask[:, 1:]).sum(-1).float()


def concatenated_forward(model, batch: dict):
    """log pi(y_w|x) and log pi(y_l|x) from ONE forward pass: the batch holds the chosen rows, then
    the rejected rows (one padding width; under ZeRO-3 one gather of the weights instead of two).
    Logits only from the first position that predicts a response token on (logits_to_keep): the
    vocabulary-wide logits of the prompt positions are never built; no KV cache."""
    mask, ids, completion = batch["attention_mask"], batch["input_ids"], batch["completion_mask"]
    first = int(completion.float().argmax(-1).min())  # the earliest response token of the batch
    keep = ids.shape[1] - max(first - 1, 0)
    logits = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids_from(mask),
        use_cache=False,
        logits_to_keep=keep,
    ).logits
    logps = sequence_logps(logits, ids[:, -keep:], completion[:, -keep:])
    n = logps.shape[0] // 2
    return logps[:n], logps[n:]


def pair_stats(model, ref_model, batch, args):
    """Losses [B] and the per-pair statistics that feed the metrics: [B, 7]
    (loss, reward chosen, reward rejected, margin, accuracy, logp chosen, logp rejected)."""
    policy_logps = concatenated_forward(model, batch)  # (chosen, rejected)
    if "ref_chosen_logps" in batch:  # precomputed: no reference model in memory
        ref_logps = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    else:
        with torch.no_grad():
            ref_logps = concatenated_forward(ref_model, batch)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        *policy_logps, *ref_logps, args.beta, args.loss_type, args.label_smoothing
    )
    margins = chosen_rewards - rejected_rewards
    accuracies = (margins > 0).float()
    stats = [losses, chosen_rewards, rejected_rewards, margins, accuracies, *policy_logps]
    return losses, torch.stack([s.detach() for s in stats], dim=-1)


# ---- data: preference pairs and prompts ----


def make_pair(prompt_ids, chosen_ids, rejected_ids, max_length: int, max_prompt_length: int | None):
    """-> ({chosen_input_ids, chosen_mask, rejected_input_ids, rejected_mask}, truncated), or None
    when the prompt leaves no room for a response. Both responses share one (truncated) prompt."""
    c = truncate(prompt_ids, chosen_ids, max_length, max_prompt_length)
    r = truncate(prompt_ids, rejected_ids, max_length, max_prompt_length)
    if c is None or r is None:
        return None
    (p, c_ids, c_trunc), (_, r_ids, r_trunc) = c, r
    pair = {
        "chosen_input_ids": p + c_ids,
        "chosen_mask": [0] * len(p) + [1] * len(c_ids),
        "rejected_input_ids": p + r_ids,
        "rejected_mask": [0] * len(p) + [1] * len(r_ids),
    }
    return pair, c_trunc or r_trunc


def tokenize_preference(ds, tokenizer, max_length: int, max_prompt_length: int | None, name: str):
    """prompt/chosen/rejected rows -> list of pairs. Pairs whose chosen and rejected are the same
    tokens (as given, or once truncated) carry no signal (zero gradient, scored as wrong): dropped
    and counted, as reward_model.py does."""
    pairs, n_truncated, n_dropped, n_identical = [], 0, 0, 0
    # A prompt that tokenizes to nothing (empty, no BOS added) gets BOS (or EOS) as context, so the
    # response's first token is scored too (logits[:, t] predicts token t + 1), as in sft.py.
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for row in ds:
        prompt_ids = encode_prompt(tokenizer, row["prompt"]) or [start]
        c, r = (encode_completion(tokenizer, row["prompt"], row[k]) for k in ("chosen", "rejected"))
        out = make_pair(prompt_ids, c, r, max_length, max_prompt_length)
        if out is None:
            n_dropped += 1
        elif out[0]["chosen_input_ids"] == out[0]["rejected_input_ids"]:
            n_identical += 1
        else:
            pairs.append(out[0])
            n_truncated += out[1]
    print(
        f"{name}: {len(pairs)} pairs, {n_truncated} truncated, {n_dropped} dropped (prompt leaves "
        f"no room for a response within max_length={max_length}), {n_identical} dropped (chosen "
        "identical to rejected)"
    )
    if not pairs and n_identical:
        raise DataError(
            f"{name}: every pair's chosen and rejected responses are identical (within max_length="
            f"{max_length}): nothing to learn"
        )
    if not pairs:
        raise DataError(
            f"{name}: no pair left after truncation (every prompt exceeds max_length={max_length})"
        )
    return pairs


def collate_pairs(pairs: list, pad_id: int) -> dict:
    """Right-padded batch of 2B rows: the B chosen sequences, then the B rejected ones (concatenated
    forward); completion_mask marks response tokens. Precomputed reference log-probs ride along."""
    seqs = [p["chosen_input_ids"] for p in pairs] + [p["rejected_input_ids"] for p in pairs]
    masks = [p["chosen_mask"] for p in pairs] + [p["rejected_mask"] for p in pairs]
    batch = {
        "input_ids": pad(seqs, pad_id),
        "attention_mask": pad([[1] * len(s) for s in seqs], 0),
        "completion_mask": pad(masks, 0),
    }
    if "ref_chosen_logps" in pairs[0]:
        batch["ref_chosen_logps"] = torch.tensor([p["ref_chosen_logps"] for p in pairs])
        batch["ref_rejected_logps"] = torch.tensor([p["ref_rejected_logps"] for p in pairs])
    return batch


def pair_loader(pairs: list, batch_size: int, pad_id: int):
    """An evaluation loader, in order (training's is make_train_loader, shuffled)."""
    collate = partial(collate_pairs, pad_id=pad_id)
    # its own generator: iterating draws nothing from the global RNG of sampling
    generator = torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(pairs, batch_size, collate_fn=collate, generator=generator)


# ---- training and evaluation ----


@torch.no_grad()
def compute_ref_logps(accelerator, model, pairs: list, batch_size: int, pad_id: int):
    """Reference log-probs of every pair, computed once, in batches, each process a share (the same
    number of batches on each, as ZeRO-3 needs); stored in the pairs."""
    if not pairs:
        return
    results = []
    with accelerator.split_between_processes(list(range(len(pairs))), apply_padding=True) as mine:
        for start in range(0, len(mine), batch_size):
            idx = mine[start : start + batch_size]
            batch = collate_pairs([pairs[i] for i in idx], pad_id)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                chosen, rejected = concatenated_forward(model, batch)
            results += list(zip(idx, chosen.float().tolist(), rejected.float().tolist()))
    for i, chosen, rejected in gather_object(results):
        pairs[i]["ref_chosen_logps"], pairs[i]["ref_rejected_logps"] = chosen, rejected


@torch.no_grad()
def evaluate(accelerator, model, ref_model, loader, args) -> dict:
    """The mean pair statistics over the whole eval set (every process's share) -> eval/ metrics."""
    model.eval()
    rows = []
    for batch in loader:
        with accelerator.autocast():
            _, stats = pair_stats(model, ref_model, batch, args)
        rows.append(accelerator.gather_for_metrics(stats.float()))
    model.train()
    rows = torch.cat(rows)
    count = torch.tensor([len(rows)], device=rows.device)
    return stat_metrics(torch.cat([rows.sum(0), count]), "eval")


def train_dpo(args, accelerator, log, tokenizer, policy, ref_model, train: list, evals: list,
              step=0, resume_from=None, checkpoints=True, save_to=()):  # fmt: skip
    """One DPO run over fixed pairs; global step numbers continue from `step`. -> the final step"""
    optimizer = adamw(
        accelerator, policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay
    )
    collate = partial(collate_pairs, pad_id=tokenizer.pad_token_id)
    train_loader = make_train_loader(accelerator, args, train, collate, "pairs")
    eval_loader = pair_loader(evals, args.per_device_eval_batch_size, tokenizer.pad_token_id)
    policy, optimizer, train_loader, eval_loader = prepare_for_training(
        accelerator, args.max_grad_norm, policy, optimizer, train_loader, eval_loader
    )
    # checkpoints also open with from_pretrained (set once: DPO-Iter, called per iteration, keeps none)
    if checkpoints:
        checkpoints_open_as_models(accelerator, tokenizer, lambda m: {"": ("", m)})
    # each process its own noise; the data order stays shared
    torch.manual_seed(args.seed + 100003 * accelerator.process_index)

    steps_per_epoch, total_steps = count_steps(args, train_loader)
    # not prepared: accelerate would step it once per process
    scheduler = lr_schedule(optimizer, args.lr_scheduler, args.warmup_ratio, total_steps)
    start, done = step, 0
    if resume_from is not None:
        restore = lambda state: scheduler.load_state_dict(state["scheduler"])
        done = load_checkpoint(accelerator, resume_from, restore)["step"] - start
    # One eval row per step: a later DPO-Iter iteration starts at the step the previous one ended
    # with an evaluation (of what it trained), so its own baseline (policy = reference) is skipped.
    if evals and args.eval_on_start and done == 0 and start == 0:
        log.log(evaluate(accelerator, policy, ref_model, eval_loader, args), start)

    # ---- the training loop: one optimizer step per ga micro-batches ----
    policy.train()
    bar = tqdm(total=total_steps, initial=done, disable=not accelerator.is_main_process, desc="dpo")
    window, window_tokens, window_start = torch.zeros(8, device=accelerator.device), 0, time.time()
    STOP.deferred = True  # a signal now stops the loop at the end of a step (StopSignal)
    ga = args.gradient_accumulation_steps
    steps = training_steps(accelerator, train_loader, ga, done, steps_per_epoch, total_steps)
    for done, micro in steps:
        # The mean loss over the pairs of the whole global batch, so 1 process and N processes
        # (and any accumulation) give the same gradient. DDP averages over processes and
        # accelerator.backward divides by ga, hence the two factors.
        local_pairs = sum(len(b["input_ids"]) // 2 for b in micro)
        n_pairs = accelerator.gather(torch.tensor(local_pairs, device=accelerator.device)).sum()
        local = torch.zeros(9, device=accelerator.device)  # 7 statistic sums, pairs, tokens
        for i, batch in enumerate(micro):
            with accelerator.accumulate(policy):
                with accelerator.autocast():
                    losses, stats = pair_stats(policy, ref_model, batch, args)
                tokens = batch["attention_mask"].sum()
                counts = torch.tensor([len(stats), tokens], device=stats.device)
                local += torch.cat([stats.float().sum(0), counts])
                # before the backward that steps (DeepSpeed steps inside backward)
                if i == ga - 1:
                    step_sums = accelerator.reduce(local, "sum")  # one sync per optimizer step
                    check_finite(step_sums[:7], "train/loss", start + done)
                loss = losses.sum() * accelerator.num_processes * ga / n_pairs
                optimizer_step(
                    accelerator, loss, [policy], optimizer, scheduler, args.max_grad_norm
                )
        window += step_sums[:8]
        window_tokens += int(step_sums[8].item())
        bar.update(1)

        # ---- log, evaluate, checkpoint ----
        if done % args.logging_steps == 0 or done == total_steps:
            elapsed = max(time.time() - window_start, 1e-9)
            metrics = {
                **stat_metrics(window, ""),
                **window_metrics(scheduler, window_tokens, window_start, done, steps_per_epoch),
                "train/pairs_per_second": window[-1].item() / elapsed,
            }
            if torch.cuda.is_available():
                metrics["train/peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            log.log(metrics, start + done)
            bar.set_postfix(
                loss=f"{metrics['train/loss']:.3f}", acc=f"{metrics['rewards/accuracies']:.2f}"
            )
            window, window_tokens, window_start = torch.zeros_like(window), 0, time.time()
        if evals and (done % args.eval_steps == 0 or done == total_steps):
            log.log(evaluate(accelerator, policy, ref_model, eval_loader, args), start + done)
        # (DPO-Iter keeps no step checkpoints: it resumes after its last complete iteration)
        state = {"scheduler": scheduler.state_dict()} if checkpoints else None
        checkpoint_or_stop(accelerator, args, start + done, start + total_steps, state)
    bar.close()
    for path in save_to:
        save_model(accelerator, policy, tokenizer, path)
    return start + done


def dpo_update(args, accelerator, log, tokenizer, policy, policy_path, ref_path, train, evals,
               step, resume_from, checkpoints, save_to) -> int:  # fmt: skip
    """DPO on fixed pairs: plain DPO's whole run, one DPO-Iter iteration's update. The frozen
    reference first (with --precompute_ref_logps it scores the pairs once and is freed), then the
    policy (unless DPO-Iter's rollout loaded it), then train_dpo. -> the final global step"""
    t0 = time.time()
    same = ref_path == policy_path  # the policy's start: step 0 is an identity in any precision
    ref_model = load_frozen(args, accelerator, AutoModelForCausalLM, ref_path, same)
    if args.precompute_ref_logps:
        # the reference runs once over the pairs and is freed: one model at a time
        batch, pad_id = args.per_device_eval_batch_size, tokenizer.pad_token_id
        for pairs in (train, evals):
            compute_ref_logps(accelerator, ref_model, pairs, batch, pad_id)
        ref_model = None
        accelerator.print(
            f"precomputed reference log-probs of {len(train) + len(evals)} pairs in "
            f"{time.time() - t0:.1f}s; the reference model is freed before the policy loads"
        )
    policy = policy or load_policy(args, policy_path)
    set_seed(args.seed)  # the same data order on every process
    return train_dpo(args, accelerator, log, tokenizer, policy, ref_model, train, evals, step,
                     resume_from, checkpoints, save_to)  # fmt: skip


# ---- DPO-Iter (iterative DPO, the paper's Sec. 4.3) ----
# Each iteration samples k responses per prompt from the current policy, scores them, pairs the
# best with the worst, and trains DPO (train_dpo) on those pairs; see main()'s loop.


def best_worst_pairs(scores: list, k: int):
    """Per prompt (k consecutive samples): (best index, worst index), or None when all k scores tie.
    Best-vs-worst of k is our choice (as RLHFlow / Xiong et al. do), giving each prompt its clearest
    pair; the paper only says it labels the samples with a reward model."""
    out = []
    for start in range(0, len(scores), k):
        group = scores[start : start + k]
        best, worst = max(range(k), key=group.__getitem__), min(range(k), key=group.__getitem__)
        out.append(None if group[best] == group[worst] else (start + best, start + worst))
    return out


@torch.no_grad()
def sample_responses(accelerator, model, tokenizer, prompt_ids: list, args) -> list:
    """args.samples_per_prompt responses per prompt, in eval mode (gradient checkpointing drops the
    KV cache in train mode), with exactly our sampling settings (none from generation_config.json).
    Under ZeRO-3 the weights are gathered once for the whole rollout.
    -> [(ids, finished)], prompt-major"""
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    config = generation_config(
        tokenizer, args.max_new_tokens, True, args.temperature, args.top_k, args.top_p
    )
    config.num_return_sequences = args.samples_per_prompt
    original, unwrapped.generation_config = unwrapped.generation_config, config
    model.eval()
    out = []
    with zero3_gathered(accelerator, unwrapped.parameters()), accelerator.autocast():
        for start in range(0, len(prompt_ids), args.generation_batch_size):
            chunk = prompt_ids[start : start + args.generation_batch_size]
            ids = pad(chunk, tokenizer.pad_token_id, "left").to(accelerator.device)
            mask = pad([[1] * len(p) for p in chunk], 0, "left").to(accelerator.device)
            generated = unwrapped.generate(
                input_ids=ids, attention_mask=mask, generation_config=config, synced_gpus=False
            )
            # each response up to and including its first EOS (a response without one: all of it)
            responses, kept, finished = truncate_after_eos(
                generated[:, ids.shape[1] :], tokenizer.eos_token_id, tokenizer.pad_token_id
            )
            lengths = kept.sum(-1).tolist()
            out += [(r[:n], f) for r, n, f in zip(responses.tolist(), lengths, finished.tolist())]
    # the saved model keeps its own generation_config
    unwrapped.generation_config = original
    return out


@torch.no_grad()
def score_samples(
    accelerator, args, tokenizer, reward_fn, reward_model, rm_tokenizer, prompts, samples
) -> list:
    """One score per sample from the reward function or the reward model (its scalar head at the
    last real token), then the missing-EOS penalty (Tulu 2.5 App. F, as in ppo.py)."""
    finished = [f for _, f in samples]
    rows = [(p["prompt"], p["prompt_ids"], ids) for p, (ids, _) in zip(prompts, samples)]
    if reward_fn is not None:
        texts, completions = zip(*[labeller_texts(tokenizer, *row) for row in rows])
        scores = call_reward_fn(reward_fn, list(texts), list(completions), finished)
    else:
        sequences = [
            reward_model_inputs(tokenizer, rm_tokenizer, *row, f) for row, f in zip(rows, finished)
        ]
        pad_id = (rm_tokenizer or tokenizer).pad_token_id
        scores = []
        for start in range(0, len(sequences), args.per_device_eval_batch_size):
            chunk = sequences[start : start + args.per_device_eval_batch_size]
            ids = pad(chunk, pad_id).to(accelerator.device)
            mask = pad([[1] * len(s) for s in chunk], 0).to(accelerator.device)
            with accelerator.autocast():
                per_token = score_tokens(reward_model, ids, mask)
            scores += per_token[torch.arange(len(chunk)), last_token_index(mask)].float().tolist()
    penalty = args.missing_eos_penalty
    return apply_missing_eos_penalty(torch.tensor(scores), torch.tensor(finished), penalty).tolist()


def build_iteration_pairs(accelerator, args, policy, tokenizer, prompts: list, score, name: str):
    """Sample k responses per prompt from the current policy (each process a share of the prompts),
    score them, and pair each prompt's best response (chosen) with its worst (rejected); prompts
    whose samples all tie, or whose best and worst are the same text, are skipped and counted."""
    k = args.samples_per_prompt
    groups = sample_and_score(accelerator, args, policy, tokenizer, prompts, score, name)
    all_scores = [s for group in groups.values() for _, _, s in group]
    pairs, n_truncated, n_dropped, n_ties, n_identical, n_unfinished_chosen = [], 0, 0, 0, 0, 0
    for i, group in groups.items():
        choice = best_worst_pairs([s for _, _, s in group], k)[0]
        if choice is None:
            n_ties += 1
            continue
        (best_ids, best_finished, best), (worst_ids, _, worst) = group[choice[0]], group[choice[1]]
        if best_ids == worst_ids:
            n_identical += 1
            continue
        out = make_pair(prompts[i]["prompt_ids"], best_ids, worst_ids, args.max_length, None)
        if out is None:
            n_dropped += 1
            continue
        pair, truncated = out
        p = prompts[i]
        text, chosen = labeller_texts(tokenizer, p["prompt"], p["prompt_ids"], best_ids)
        rejected = labeller_texts(tokenizer, p["prompt"], p["prompt_ids"], worst_ids)[1]
        pair["record"] = {  # for iter_K/pairs.jsonl: what the labeller read
            "prompt": text,
            "chosen": chosen,
            "chosen_score": best,
            "rejected": rejected,
            "rejected_score": worst,
        }
        pairs.append(pair)
        n_truncated += truncated
        n_unfinished_chosen += not best_finished
    unfinished = sum(not f for g in groups.values() for _, f, _ in g) / max(len(all_scores), 1)
    accelerator.print(
        f"{name}: {len(pairs)} pairs from {len(groups)} prompts x {k} samples, "
        f"{n_ties} skipped (all samples tied), {n_identical} skipped (best and worst identical), "
        f"{n_truncated} truncated, {n_dropped} dropped; {unfinished:.0%} of samples unfinished"
    )
    stats = {
        "pairs": len(pairs),
        "ties_skipped": n_ties,
        "identical_skipped": n_identical,
        "scores_mean": sum(all_scores) / len(all_scores),
        "unfinished": unfinished,
        "unfinished_chosen": n_unfinished_chosen / max(len(pairs), 1),
    }
    if not pairs:
        raise DataError(
            f"{name}: every prompt's {k} samples got the same score (or the same text); "
            "no preference pair to train on"
        )
    return pairs, stats


def rollout_pairs(
    args, accelerator, log, tokenizer, policy_path, train, evals, score, iteration, step
):
    """DPO-Iter's rollout: load the current policy, sample from it, label, pair the best with the
    worst (train and eval prompts), and log the iteration's pair counts and mean score.
    -> (policy, which then trains on them, train pairs, eval pairs, stats)"""
    policy = load_policy(args, policy_path)
    if accelerator.state.deepspeed_plugin is None:
        policy.to(accelerator.device)
    # each process its own noise
    torch.manual_seed(args.seed + iteration + 100003 * accelerator.process_index)
    build = partial(build_iteration_pairs, accelerator, args, policy, tokenizer)
    tag = f"iteration {iteration}"
    train_pairs, stats = build(train, score, f"{tag} train")
    eval_pairs = build(evals, score, f"{tag} eval")[0] if evals else []
    names = ("pairs", "ties_skipped", "unfinished", "unfinished_chosen")
    metrics = {"iteration": iteration, **{f"iteration/{n}": stats[n] for n in names}}
    log.log({**metrics, "objective/scores": stats["scores_mean"]}, step)
    return policy, train_pairs, eval_pairs, stats


# ---- main ----


def main(args: Args):
    # ---- arguments and labeller, checked before any model is loaded ----
    online = check_args(args)
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else None
    if args.reward_model_name_or_path:
        check_reward_model(args.reward_model_name_or_path, args.trust_remote_code)

    # ---- accelerator, tokenizer and data: pairs (DPO) or prompts (DPO-Iter) ----
    accelerator = make_accelerator(args, args.gradient_accumulation_steps)
    describe_run(
        accelerator, args.per_device_train_batch_size, args.gradient_accumulation_steps, "pairs"
    )
    set_seed(args.seed)
    tokenizer = load_tokenizer(args)

    def load_data(split: str, name: str) -> list:
        ds = load_split(args.dataset_name, args.dataset_config, split)
        limits = (args.max_length, args.max_prompt_length)
        if online:
            return tokenize_prompts(to_prompts(ds), tokenizer, *limits, name)
        return tokenize_preference(to_preference(ds), tokenizer, *limits, name)

    train = [] if args.eval_only else load_data(args.train_split, "train")
    evals = load_data(args.eval_split, "eval") if args.eval_split else []

    # ---- resume point (DPO: checkpoints/step_N; DPO-Iter: the last iter_K), output directory ----
    first, step, policy_path, resume_from, log = open_run(args, accelerator, online, train)
    ref_path = args.ref_model_name_or_path or args.model_name_or_path

    if args.eval_only:  # DPO's eval pairs against the reference, the policy frozen too
        return eval_only_run(args, accelerator, log, tokenizer, ref_path, evals)

    # ---- DPO-Iter's labeller of the samples: a reward model or a reward function ----
    score = load_labeller(args, accelerator, tokenizer, reward_fn) if online else None
    if policy_path is not None:
        accelerator.print(f"resumed after iteration {first - 1} (step {step}) from {policy_path}")

    # Plain DPO is one iteration of this loop: the update alone, on the dataset's pairs. DPO-Iter
    # (Sec. 4.3) runs --iterations of rollout (sample, label, pair), update, save; each trained
    # policy is the next iteration's reference.
    for iteration in range(first, args.iterations + 1):
        iter_dir = Path(args.output_dir) / f"iter_{iteration}"
        # Iteration 1's reference is --ref_model_name_or_path or the initial policy; later
        # iterations' is the policy the previous iteration trained.
        ref_at = ref_path if iteration == 1 else policy_path
        policy_path = policy_path or args.model_name_or_path
        policy, train_pairs, eval_pairs = None, train, evals
        if online:  # ---- rollout (DPO-Iter): sample from the current policy, label, pair ----
            policy, train_pairs, eval_pairs, stats = rollout_pairs(
                args, accelerator, log, tokenizer, policy_path, train, evals, score, iteration, step
            )
        # ---- update: DPO on this iteration's pairs ----
        # DPO-Iter keeps no step checkpoints: it resumes after its last complete iteration
        save_to = (iter_dir,) * online + (args.output_dir,) * (iteration == args.iterations)
        step = dpo_update(args, accelerator, log, tokenizer, policy, policy_path, ref_at,
                          train_pairs, eval_pairs, step, resume_from, not online, save_to)  # fmt: skip
        # ---- save (DPO-Iter): dpo_update saved the policy; pairs.jsonl, iteration.json (done) ----
        if online:
            record = {"iteration": iteration, "step": step, "reference": str(ref_at), **stats}
            on_main(accelerator, save_iteration, iter_dir, train_pairs, record)
        accelerator.wait_for_everyone()
        # a signal in the loop's last step or while iter_K was saved stops here, iter_K complete;
        # from here to the next loop (sampling) a signal stops at once
        if STOP.requested(accelerator) and iteration < args.iterations:
            raise KeyboardInterrupt
        STOP.deferred = False
        # drop this iteration's engine, optimizer and wrappers before the next
        del policy
        accelerator.free_memory()
        policy_path = str(iter_dir)
    end_training(accelerator)


# ---- this stage's plumbing (not shared) ----


def check_args(args: Args) -> bool:
    """Argument mistakes, one line each, before anything loads. -> whether this is DPO-Iter."""
    online = args.reward_model_name_or_path is not None or args.reward_fn is not None
    positive = ("per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "logging_steps", "eval_steps", "max_length",
                "max_new_tokens", "generation_batch_size", "iterations")  # fmt: skip
    check_common_args(args, positive)
    if not args.beta > 0:
        raise DataError(f"--beta must be > 0, got {args.beta}")
    if args.weight_decay < 0 or not args.max_grad_norm > 0:
        raise DataError("--weight_decay must be >= 0 and --max_grad_norm > 0")
    if not 0 <= args.label_smoothing < 0.5:
        raise DataError(f"--label_smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if args.loss_type == "ipo" and args.label_smoothing > 0:
        raise DataError(
            "--label_smoothing applies to the sigmoid loss (conservative DPO), not to ipo"
        )
    if not args.temperature > 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise DataError("--temperature must be > 0, --top_p within (0, 1], --top_k >= 0")
    if args.missing_eos_penalty is not None and not math.isfinite(args.missing_eos_penalty):
        raise DataError(
            f"--missing_eos_penalty must be a finite number, got {args.missing_eos_penalty}"
        )
    if args.reward_model_name_or_path is not None and args.reward_fn is not None:
        raise DataError("give either --reward_model_name_or_path or --reward_fn, not both")
    if args.iterations > 1 and not online:
        raise DataError(
            "--iterations > 1 (DPO-Iter) needs --reward_model_name_or_path or --reward_fn to label "
            "samples"
        )
    if online and args.samples_per_prompt < 2:
        raise DataError("DPO-Iter needs --samples_per_prompt >= 2 to form a best/worst pair")
    if args.eval_only and (args.eval_split is None or online):
        raise DataError(
            "--eval_only evaluates preference pairs: it needs --eval_split and no reward "
            "model/function"
        )
    if args.ref_model_name_or_path:
        check_model_path(args.ref_model_name_or_path, "reference model")
    return online


def open_run(args, accelerator, online: bool, train: list):
    """The resume point (DPO: checkpoints/step_N; DPO-Iter: the last complete iter_K), the output
    directory, the tracker and metrics.jsonl. -> (first iteration, global step, DPO-Iter's policy path
    or None, DPO's checkpoint or None, MetricsLog)"""
    # `step` is where the next iteration's global steps start; DPO's checkpoint carries its own
    first, step, policy_path, resume_from, resume_step = 1, 0, None, None, 0
    if online:
        first, step, policy_path = find_iteration(
            accelerator, args.output_dir, args.resume_from_checkpoint
        )
        resume_step = step
    else:
        resume_from = find_checkpoint(accelerator, args.output_dir, args.resume_from_checkpoint)
        if resume_from is not None:
            resume_step = json.loads((resume_from / "step.json").read_text())["step"]
    resuming = resume_from or (Path(policy_path) if policy_path else None)
    # refuse to mix runs (--overwrite_output_dir also clears iter_K, which a resume would pick up)
    # and a resume must share the process count and the training data (pairs or prompts)
    on_main(accelerator, prepare_output_dir, args, resuming, accelerator.num_processes, train)
    if first > 1 and accelerator.is_main_process:  # the rows of a killed iteration `first`
        keep_rows_up_to(Path(args.output_dir) / "metrics.jsonl", step, first - 1)
    on_main(accelerator, start_tracker, accelerator, args, "dpo", resuming is not None)
    log = MetricsLog(accelerator, args.output_dir, resume_step=resume_step)
    return first, step, policy_path, resume_from, log


def eval_only_run(args, accelerator, log, tokenizer, ref_path: str, evals: list):
    """--eval_only: the eval/ metrics of the policy against its reference, written and printed."""
    eval_batch = args.per_device_eval_batch_size
    ref_model = load_frozen(args, accelerator, AutoModelForCausalLM, ref_path)
    if args.precompute_ref_logps:  # one model in memory at a time, as in training
        compute_ref_logps(accelerator, ref_model, evals, eval_batch, tokenizer.pad_token_id)
        ref_model = None
    policy = load_frozen(args, accelerator, AutoModelForCausalLM, args.model_name_or_path)
    eval_loader = accelerator.prepare(pair_loader(evals, eval_batch, tokenizer.pad_token_id))
    metrics = evaluate(accelerator, policy, ref_model, eval_loader, args)
    log.log(metrics, 0)
    accelerator.print(json.dumps(metrics))
    end_training(accelerator)


def sample_and_score(accelerator, args, policy, tokenizer, prompts: list, score, name: str) -> dict:
    """DPO-Iter's samples, each process a share of the prompts, gathered on every process.
    -> {prompt index: [(response ids, finished, score)] x samples_per_prompt}, in prompt order"""
    k = args.samples_per_prompt
    error = None
    with accelerator.split_between_processes(list(range(len(prompts))), apply_padding=True) as mine:
        mine_ids = [prompts[i]["prompt_ids"] for i in mine]
        samples = sample_responses(accelerator, policy, tokenizer, mine_ids, args)
        owners = [i for i in mine for _ in range(k)]
        # A labelling error stops every process, not only the one whose samples failed.
        try:
            scores = score([prompts[i] for i in owners], samples)
        except DataError as e:
            error, scores = str(e), [0.0] * len(samples)
        local = [(i, ids, f, s) for i, (ids, f), s in zip(owners, samples, scores)]
    errors = [e for e in gather_object([error]) if e]
    if errors:
        raise DataError(errors[0])
    gathered = gather_object(local)
    # a reward model's NaN stops the run here
    check_finite(torch.tensor([s for *_, s in gathered]), f"{name} reward", 0)
    by_prompt = {}
    for i, ids, finished, s in gathered:
        by_prompt.setdefault(i, []).append((ids, finished, s))
    # padding duplicated some prompts: keep one copy
    return {i: by_prompt[i][:k] for i in sorted(by_prompt)}


def load_policy(args, path: str):
    """The trained policy: float32 weights (mixed precision from --bf16 autocast or DeepSpeed)."""
    model = load_pretrained(AutoModelForCausalLM, path, torch.float32, args)
    model = disable_dropout(model)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
        model.config.use_cache = False
    return model


def load_frozen(args, accelerator, cls, path: str, policy_copy: bool = False):
    """A frozen model (reference, reward model): bfloat16 under --bf16; ZeRO-3 gives it an engine.
    policy_copy (the reference is the checkpoint the policy starts from): the policy's own weight
    dtype, float32 under --bf16 autocast (bf16 under DeepSpeed, whose bf16 casts the policy's
    module), so step 0 is an exact identity, every margin 0; a bf16 copy under autocast rounds
    norms, embeddings and the residual stream differently. It costs 2x a bf16 reference's memory
    (with --precompute_ref_logps it is freed before the policy loads)."""
    bf16 = args.bf16 and (not policy_copy or accelerator.state.deepspeed_plugin is not None)
    dtype = torch.bfloat16 if bf16 else torch.float32
    return prepare_frozen(accelerator, load_pretrained(cls, path, dtype, args))


def load_labeller(args, accelerator, tokenizer, reward_fn):
    """DPO-Iter's labeller, score(prompts, samples) -> scores (score_samples): the reward function,
    or the frozen reward model with its own tokenizer when its vocabulary differs from the policy's."""
    reward_model = None
    rm_tokenizer = load_reward_tokenizer(args, tokenizer)  # None: the policy's vocabulary
    if rm_path := args.reward_model_name_or_path:
        reward_model = load_frozen(args, accelerator, AutoModelForSequenceClassification, rm_path)
        # score_tokens runs HF's forward, which needs a pad id to batch (its pooling is not used)
        rm_config = getattr(reward_model, "module", reward_model).config
        rm_config.pad_token_id = (rm_tokenizer or tokenizer).pad_token_id
    return partial(
        score_samples, accelerator, args, tokenizer, reward_fn, reward_model, rm_tokenizer
    )


def find_iteration(accelerator, output_dir, resume_from_checkpoint: str | None):
    """DPO-Iter resumes after the last complete iter_K (its policy saved, then iteration.json written
    by save_iteration); a later, incomplete iter_K (a run stopped in it) runs again, and is named.
    -> (first iteration to run, global step, policy path or None)."""
    if resume_from_checkpoint is None:
        return 1, 0, None
    ks = sorted(int(p.name[5:]) for p in Path(output_dir).glob("iter_*") if p.name[5:].isdigit())
    paths = [Path(output_dir) / f"iter_{k}" for k in ks]
    while paths and not (paths[-1] / "iteration.json").exists():
        accelerator.print(f"{paths.pop()} is incomplete (no iteration.json): it runs again")
    if not paths:
        raise DataError(
            f"--resume_from_checkpoint: no complete DPO-Iter iteration (iter_K/iteration.json) in "
            f"{output_dir}"
        )
    try:
        step = int(json.loads((paths[-1] / "iteration.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        cause = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        raise DataError(f"{paths[-1]}: cannot resume after it (iteration.json: {cause})") from None
    return int(paths[-1].name[5:]) + 1, step, str(paths[-1])


def save_iteration(iter_dir: Path, pairs: list, record: dict):
    """iter_K's pairs.jsonl, then iteration.json, which marks iter_K complete (find_iteration); after
    its policy, each under a temporary name and renamed. A failed write stops with one line. Main
    process."""
    texts = {
        "pairs.jsonl": "".join(json.dumps(pair["record"]) + "\n" for pair in pairs),
        "iteration.json": json.dumps(record),
    }
    for name, text in texts.items():
        tmp = iter_dir / f"{name}.tmp"
        try:
            tmp.write_text(text)
        except OSError as e:  # a full disk
            tmp.unlink(missing_ok=True)
            raise DataError(
                f"cannot write {iter_dir / name} ({write_error(e, iter_dir)})"
            ) from None
        tmp.replace(iter_dir / name)


STAT_NAMES = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
              "rewards/accuracies", "logps/chosen", "logps/rejected"]  # fmt: skip


def stat_metrics(total: torch.Tensor, prefix: str) -> dict:
    """[8] = (sums of the 7 statistics, pair count) -> means, named for the ecosystem (docs/design.md
    section 6): train/loss and rewards/... as TRL logs them, eval/... for prefix "eval"."""
    names = ["train/loss", *STAT_NAMES[1:]] if prefix == "" else [f"eval/{n}" for n in STAT_NAMES]
    return {name: (total[i] / total[-1]).item() for i, name in enumerate(names)}


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


def make_train_loader(accelerator, args, examples: list, collate, unit: str):
    """The shuffled training loader; a DataError when the examples make no full optimizer step."""
    loader = torch.utils.data.DataLoader(
        examples,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        collate_fn=collate,
        # Its own generator: torch draws a seed from it for each new iterator (a resume mid-epoch
        # makes one more), not from the global RNG of sampling and dropout. The order comes from
        # accelerate's seedable sampler, which reseeds it with seed + epoch.
        generator=torch.Generator().manual_seed(args.seed),
    )
    ga = args.gradient_accumulation_steps
    if math.ceil(len(loader) / accelerator.num_processes) < ga:  # accelerate's shard length
        raise DataError(
            f"{len(examples)} training {unit} make no full step of "
            f"{args.per_device_train_batch_size} x {accelerator.num_processes} x {ga}"
        )
    return loader


def count_steps(args, train_loader) -> tuple:
    """(optimizer steps per epoch, total optimizer steps) of a prepared loader. An incomplete trailing
    accumulation group is skipped, so every step sees ga micro-batches; --max_steps > 0 overrides
    --num_train_epochs."""
    steps_per_epoch = len(train_loader) // args.gradient_accumulation_steps
    if args.max_steps > 0:
        return steps_per_epoch, args.max_steps
    return steps_per_epoch, math.ceil(args.num_train_epochs * steps_per_epoch)


def training_steps(accelerator, loader, ga: int, step: int, steps_per_epoch: int, total: int):
    """Yield (the number of each optimizer step after `step`, counted from 1, and its ga micro-batches)
    up to step `total`: the same data order on every process and after a resume (accelerate's
    seedable sampler reseeds each epoch with seed + epoch; a resume skips the batches it has seen)."""
    while step < total:
        loader.set_epoch(step // steps_per_epoch)
        skip = (step % steps_per_epoch) * ga
        batches = iter(accelerator.skip_first_batches(loader, skip) if skip else loader)
        for _ in range(steps_per_epoch - step % steps_per_epoch):
            step += 1
            yield step, list(islice(batches, ga))
            if step >= total:
                return


def window_metrics(scheduler, tokens: float, window_start: float, step: int, steps_per_epoch: int):
    """The train/ metrics every stage logs beside its own: learning rate, throughput, epoch."""
    return {
        "train/lr": scheduler.get_last_lr()[0],
        "train/tokens_per_second": tokens / max(time.time() - window_start, 1e-9),
        "epoch": step / steps_per_epoch,
    }


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


def full_state_dict(accelerator, model) -> dict:
    """Gathered under ZeRO-3; without torch.compile's `_orig_mod.` (accelerate's --dynamo_backend)."""
    state = accelerator.get_state_dict(model)  # None but on the main process under ZeRO-3
    return None if state is None else {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def save_model(accelerator, model, tokenizer, output_dir):
    """Loadable with plain from_pretrained; the state dict is gathered first (ZeRO-3 safe)."""
    state_dict = full_state_dict(accelerator, model)

    def write(folder: Path):
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        unwrapped.save_pretrained(folder, state_dict=state_dict)
        tokenizer.save_pretrained(folder)

    on_main(accelerator, write_model_dir, output_dir, write)
    accelerator.wait_for_everyone()  # a barrier last: gloo can hang at exit on a broadcast's cleanup


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


# ---- used by the stages that score samples (ppo.py, dpo.py's DPO-Iter) ----


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
