"""Reward modeling: the second stage of RLHF, a Bradley-Terry reward model from preference pairs.

A scalar head on a causal LM scores a whole response at its last real token. Trained on pairs
(prompt x, chosen y_w, rejected y_l) by minimizing the negative log-likelihood of the Bradley-Terry
model (Xu et al. 2024, Sec. 3, Eq. 3-4):

    loss = -log sigmoid(r(x, y_w) - r(x, y_l) - margin)      [+ c * (r(x, y_w) + r(x, y_l))^2]

PPO optimizes this reward and iterative DPO labels its own samples with it (paper Sec. 4.3, 6), so
the script guards what later stages rely on: the reward is read at the last real token found from
the attention mask (the same for left or right padding and for EOS-as-pad tokenizers), and the
output is a plain AutoModelForSequenceClassification with `config.reward_mean` / `config.reward_std`
(over the eval responses) so later stages can normalize scores.

    python reward_model.py --model_name_or_path outputs/sft --dataset_name pairs.jsonl --output_dir outputs/rm
    python reward_model.py --eval_only --model_name_or_path outputs/rm --dataset_name pairs.jsonl \
        --eval_split test --output_dir outputs/rm_eval
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml reward_model.py ...

Self-contained on purpose: the helpers fenced at the bottom are repeated, byte-identical, in every
script that uses them.
"""

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
import urllib.parse
from dataclasses import asdict, dataclass
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
from transformers import AutoModelForSequenceClassification, AutoTokenizer


@dataclass
class Args:
    """Reward modeling: train a Bradley-Terry reward model (a scalar head read at the last token) on
    preference pairs (prompt+chosen+rejected, or HH-RLHF transcripts; SafeRLHF through
    prepare_data.py), or score one with --eval_only.

    Example, offline with local files:
    python reward_model.py --model_name_or_path outputs/sft --dataset_name pairs.jsonl --max_steps 100
    --output_dir outputs/reward_model
    """

    # ---- model and data ----
    model_name_or_path: str = "EleutherAI/pythia-160m"
    """hub id or local directory of the causal LM (usually the SFT model) or, with --eval_only, the reward model"""
    tokenizer_name_or_path: str | None = None
    """tokenizer to use (defaults to model_name_or_path)"""
    chat_template_path: str | None = None
    """a Jinja chat template file for a tokenizer without one (or to replace its own); saved with it"""
    trust_remote_code: bool = False
    """allow model/tokenizer code from the hub to run (opt-in)"""
    attn_implementation: str | None = None
    """attention kernel of every model loaded: eager, sdpa, flash_attention_2, ... (None: transformers')"""
    dataset_name: str = "Anthropic/hh-rlhf"
    """hub id, or a local .json/.jsonl/.parquet file or a directory of them (files named after splits)"""
    dataset_config: str | None = None
    """hub dataset configuration name"""
    train_split: str = "train"
    """split to train on; slicing works, e.g. 'train[:90%]'"""
    eval_split: str | None = None
    """split for eval accuracy and the reward statistics, e.g. 'test' or 'train[90%:]' (None: no evaluation)"""
    max_length: int = 512
    """maximum tokens of prompt + response"""
    max_prompt_length: int | None = None
    """prompts longer than this keep their last tokens (None: prompts are not truncated)"""
    center_rewards_coefficient: float = 0.0
    """weight c of the penalty c * (r_chosen + r_rejected)^2 that keeps rewards near 0 (Eisenstein et al. 2023)"""
    eval_only: bool = False
    """no training: score the reward model at model_name_or_path on eval_split (else train_split); writes only
    output_dir/eval_results.json, and refuses an output_dir that holds a run or is the model's own directory"""
    # ---- optimization (defaults: Tulu 2.5 App. F, one epoch at 1e-5 with 3% warmup) ----
    seed: int = 1
    """random seed (head init, data order)"""
    learning_rate: float = 1e-5
    """peak learning rate of AdamW"""
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """learning-rate schedule after warmup"""
    warmup_ratio: float = 0.03
    """fraction of the optimizer steps spent warming up linearly"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    num_train_epochs: float = 1.0
    """passes over the training set (one is usual: reward models overfit quickly)"""
    max_steps: int = -1
    """total optimizer steps; overrides num_train_epochs when > 0"""
    per_device_train_batch_size: int = 8
    """preference pairs per device per micro-batch (each pair is two sequences)"""
    per_device_eval_batch_size: int = 8
    """preference pairs per device per eval batch"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    bf16: bool = False
    """train in bfloat16 mixed precision (the weights stay float32)"""
    gradient_checkpointing: bool = False
    """trade compute for memory by recomputing activations"""
    # ---- logging, evaluation, saving ----
    output_dir: str = "outputs/reward_model"
    """where the model, args.json, metrics.jsonl, eval_results.json and checkpoints/ go"""
    overwrite_output_dir: bool = False
    """replace a previous run in output_dir (its checkpoints, metrics and model)"""
    logging_steps: int = 10
    """log train metrics every this many optimizer steps"""
    eval_steps: int = 100
    """evaluate every this many optimizer steps (and at the end)"""
    save_steps: int = 500
    """write a resumable checkpoint every this many optimizer steps (0: never)"""
    save_total_limit: int | None = None
    """keep only the newest N checkpoints, deleting older ones after each save (PPO's best/ is apart)"""
    resume_from_checkpoint: str | None = None
    """'latest' or a path to output_dir/checkpoints/step_N to continue from"""
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    """experiment tracker (its package must be installed)"""
    project: str | None = None
    """tracker project (default: $WANDB_PROJECT for wandb, else the stage's name)"""
    run_name: str | None = None
    """tracker run name (default: wandb's $WANDB_NAME or its own; tensorboard: the project)"""


# ---- the math: Bradley-Terry loss on rewards read at the last real token (Sec. 3, Eq. 3-4) ----


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r(x, y) of each sequence: the head's score at its last real token (found from the mask)."""
    scores = score_tokens(model, input_ids, attention_mask)
    return scores[
        torch.arange(scores.shape[0], device=scores.device), last_token_index(attention_mask)
    ].float()


def reward_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float = 0.0,
) -> torch.Tensor:
    """Per-pair Bradley-Terry loss (Eq. 4): -log sigmoid(r_chosen - r_rejected - margin), plus the
    optional centring penalty c * (r_chosen + r_rejected)^2 (Eisenstein et al. 2023, as in TRL)."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * (chosen + rejected) ** 2
    return loss


def init_head(head: torch.nn.Linear):
    """A fresh scalar head: weights N(0, 1/(d+1)), zero bias (Stiennon et al. 2020), so initial rewards
    have about unit scale whatever the hidden size d."""
    gather = contextlib.nullcontext()
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():  # the weights are sharded: gather, change on rank 0, re-shard
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=0)
    with gather:
        torch.nn.init.normal_(head.weight, std=1 / math.sqrt(head.in_features + 1))
        if head.bias is not None:
            torch.nn.init.zeros_(head.bias)


# ---- reward-model data: preference pairs, chosen and rejected in one batch ----


def to_reward_pairs(ds: Dataset) -> Dataset:
    """Any preference shape -> columns prompt, chosen, rejected, margin (an optional `margin` column of
    finite numbers is kept for the margin loss; 0 when absent)."""
    cols = ds.column_names
    margins = list(ds["margin"]) if "margin" in cols else None
    for i, m in enumerate(margins or []):
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
            raise DataError(f"row {i}, column 'margin': expected a finite number, found {m!r}")
    pairs = to_preference(ds)
    return pairs.add_column(
        "margin", [float(m) for m in margins] if margins else [0.0] * len(pairs)
    )


def tokenize_pairs(
    ds: Dataset, tokenizer, max_length: int, max_prompt_length: int | None, name: str
) -> list:
    """-> list of {chosen_ids, rejected_ids, margin}: prompt + response + EOS token ids for each side.
    Logs how many pairs were truncated or dropped; a pair whose two sides are identical (as given, or
    after truncation) carries no preference and is dropped with a count."""
    examples, n_truncated, n_dropped, n_identical = [], 0, 0, 0
    for i, row in enumerate(ds):
        if isinstance(row["prompt"], str) and not (
            isinstance(row["chosen"], str) and isinstance(row["rejected"], str)
        ):
            raise DataError(
                f"row {i}: chosen and rejected as messages need the prompt as messages too"
            )
        prompt_ids = encode_prompt(tokenizer, row["prompt"])
        completions = [
            encode_completion(tokenizer, row["prompt"], row[s]) for s in ("chosen", "rejected")
        ]
        chosen, rejected = (
            truncate(prompt_ids, c, max_length, max_prompt_length) for c in completions
        )
        if chosen is None or rejected is None:
            n_dropped += 1
            continue
        chosen_ids, rejected_ids = chosen[0] + chosen[1], rejected[0] + rejected[1]
        if chosen_ids == rejected_ids:
            n_identical += 1
            continue
        n_truncated += chosen[2] or rejected[2]
        examples.append(
            {"chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "margin": row["margin"]}
        )
    print(
        f"{name}: {len(examples)} pairs, {n_truncated} truncated, {n_dropped} dropped (prompt leaves no room "
        f"for a response within max_length={max_length}), {n_identical} dropped (chosen identical to rejected)"
    )
    if not examples:
        raise DataError(
            f"{name}: no preference pair left ({n_dropped} with prompts over max_length={max_length}, "
            f"{n_identical} with chosen identical to rejected)"
        )
    return examples


def collate_reward_pairs(examples: list, pad_id: int) -> dict:
    """One right-padded batch of 2B sequences, the B chosen then the B rejected, for one forward pass."""
    seqs = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    return {
        "input_ids": pad(seqs, pad_id),
        "attention_mask": pad([[1] * len(s) for s in seqs], 0),
        "margin": torch.tensor([e["margin"] for e in examples], dtype=torch.float),
    }


@torch.no_grad()
def evaluate_rewards(accelerator, model, loader, center_rewards_coefficient: float = 0.0) -> dict:
    """Accuracy and reward statistics over every pair of the loader (gather_for_metrics drops the
    duplicates that even batches add on several processes)."""
    model.eval()
    rows = []
    for batch in loader:
        with accelerator.autocast():
            rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
        n = len(batch["margin"])
        rows.append(
            accelerator.gather_for_metrics(
                torch.stack([rewards[:n], rewards[n:], batch["margin"]], 1)
            )
        )
    model.train()
    chosen, rejected, margin = torch.cat(rows).T
    both = torch.cat([chosen, rejected])
    loss = reward_loss(chosen, rejected, margin, center_rewards_coefficient)
    return {
        "eval/loss": loss.mean().item(),
        "eval/accuracy": (chosen > rejected).float().mean().item(),
        "eval/reward_chosen": chosen.mean().item(),
        "eval/reward_rejected": rejected.mean().item(),
        "eval/reward_mean": both.mean().item(),
        "eval/reward_std": both.std().item(),
    }


# ---- the loop's phases: one optimizer step, then its log ----


def reward_model_step(accelerator, args, model, optimizer, scheduler, micro: list, step: int):
    """One optimizer step over its ga micro-batches (forward, backward each; the step at the last).
    -> the step's global [loss sum, correct pairs, margin sum, pairs, tokens]"""
    ga = args.gradient_accumulation_steps
    # Average over the pairs of the whole global batch, so 1 process and N processes (and any
    # accumulation) give the same gradient; DDP averages over processes, hence the factor.
    n_pairs = accelerator.gather(
        torch.tensor([sum(len(b["margin"]) for b in micro)], device=accelerator.device)
    ).sum()
    local = torch.zeros(5, device=accelerator.device)  # this process's share of the window
    for i, batch in enumerate(micro):
        with accelerator.accumulate(model):
            # chosen and rejected in one forward pass: the first n rows are chosen
            with accelerator.autocast():
                rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
            n = len(batch["margin"])
            chosen, rejected = rewards[:n], rewards[n:]
            loss = reward_loss(chosen, rejected, batch["margin"], args.center_rewards_coefficient)
            local += torch.stack(
                [
                    loss.sum(),
                    (chosen > rejected).float().sum(),
                    (chosen - rejected).sum(),
                    torch.tensor(float(n), device=loss.device),
                    batch["attention_mask"].sum().float(),
                ]
            ).detach()
            # before the backward that steps (DeepSpeed steps inside backward)
            if i == ga - 1:
                step_sums = accelerator.reduce(local, "sum")  # one sync per optimizer step
                check_finite(step_sums[0], "train/loss", step)
            loss = loss.sum() * accelerator.num_processes * ga / n_pairs
            optimizer_step(accelerator, loss, [model], optimizer, scheduler, args.max_grad_norm)
    return step_sums


def log_reward_window(log, bar, window, window_start: float, scheduler, step: int, steps_per_epoch):
    """train/ metrics of the steps since the last log, from their global sums. -> the next window's
    start time"""
    loss_sum, correct, margin_sum, n_seen, tokens = window.tolist()
    metrics = {
        "train/loss": loss_sum / n_seen,
        "train/accuracy": correct / n_seen,
        "train/margin": margin_sum / n_seen,
        **window_metrics(scheduler, tokens, window_start, step, steps_per_epoch),
    }
    log.log(metrics, step)
    bar.set_postfix(
        loss=f"{metrics['train/loss']:.3f}",
        acc=f"{metrics['train/accuracy']:.2f}",
        tok_s=f"{metrics['train/tokens_per_second']:.0f}",
    )
    window.zero_()
    return time.time()


# ---- reward statistics: later stages normalize scores by them ----


def evaluate_only(accelerator, args, model, eval_loader, n_pairs: int, split: str):
    """--eval_only: score an existing reward model's pairs into eval_results.json (no training)."""
    model, eval_loader = accelerator.prepare(model, eval_loader)
    metrics = evaluate_rewards(accelerator, model, eval_loader, args.center_rewards_coefficient)
    save_reward_statistics(accelerator, metrics, n_pairs, split, args.output_dir, 0)
    accelerator.print(json.dumps(metrics))
    end_training(accelerator)


def final_reward_statistics(accelerator, args, model, eval_loader, metrics, n_pairs, split, step):
    """The trained model's reward mean and std (from the last evaluation, or computed now over the
    train responses), into eval_results.json and the saved model's config."""
    if metrics is None:
        accelerator.print(
            "no eval split: reward_mean/reward_std are computed over the train responses"
        )
        metrics = evaluate_rewards(accelerator, model, eval_loader, args.center_rewards_coefficient)
    stats = save_reward_statistics(accelerator, metrics, n_pairs, split, args.output_dir, step)
    config = accelerator.unwrap_model(model, keep_torch_compile=False).config
    config.reward_mean, config.reward_std = stats
    accelerator.print(f"reward_mean={config.reward_mean:.4f} reward_std={config.reward_std:.4f}")


# ---- main, in phases: check -> data -> model -> prepare -> train -> statistics and save ----


def main(args: Args):
    # ---- 1. arguments and data, checked before any model is loaded ----
    check_reward_args(args)
    ga = args.gradient_accumulation_steps  # one step = per_device batch x processes x ga (in pairs)
    accelerator = make_accelerator(args, ga)
    describe_run(accelerator, args.per_device_train_batch_size, ga, "pairs")
    set_seed(args.seed)
    raw = {}
    for name, split in (
        [("eval", args.eval_split or args.train_split)]
        if args.eval_only
        else [("train", args.train_split)]
        + ([("eval", args.eval_split)] if args.eval_split else [])
    ):
        raw[name] = to_reward_pairs(load_split(args.dataset_name, args.dataset_config, split))
    tokenizer = load_tokenizer(args)
    pairs = {
        name: tokenize_pairs(ds, tokenizer, args.max_length, args.max_prompt_length, name)
        for name, ds in raw.items()
    }
    train, evals = pairs.get("train", []), pairs.get("eval", [])
    split = args.eval_split or args.train_split  # where the reward statistics come from
    if args.eval_only and args.eval_split is None:
        print(f"--eval_only without --eval_split: scoring split '{args.train_split}'")
    collate = lambda examples: collate_reward_pairs(examples, tokenizer.pad_token_id)
    # The eval loader also yields the reward statistics; with no eval split they come from the train pairs.
    eval_loader = torch.utils.data.DataLoader(
        evals or train, batch_size=args.per_device_eval_batch_size, collate_fn=collate
    )
    train_loader = train and make_train_loader(accelerator, args, train, collate, "pairs")
    resume_from = (
        None
        if args.eval_only
        else find_checkpoint(accelerator, args.output_dir, args.resume_from_checkpoint)
    )
    if not args.eval_only:  # refuse to mix runs; all processes stop on the same verdict
        n = accelerator.num_processes  # a resume must share it, and the training pairs
        on_main(accelerator, prepare_output_dir, args, resume_from, n, train)
    resuming = resume_from is not None or args.eval_only
    on_main(accelerator, start_tracker, accelerator, args, "reward_model", resuming)

    # ---- 2. model: float32 weights (mixed precision comes from --bf16 autocast or DeepSpeed) ----
    model, fresh_head = load_reward_model(args, tokenizer)
    if fresh_head:
        if args.eval_only:
            raise DataError(
                f"--eval_only needs a reward model; {args.model_name_or_path} has no trained `score` head"
            )
        init_head(model.score)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
        model.config.use_cache = False
    if args.eval_only:
        evaluate_only(accelerator, args, model, eval_loader, len(evals), split)
        return

    # ---- 3. prepare: optimizer, DeepSpeed settings, schedule, resume ----
    model, optimizer, scheduler, train_loader, eval_loader, step = prepare_training(
        accelerator, args, model, tokenizer, train_loader, eval_loader, resume_from
    )
    steps_per_epoch, total_steps = count_steps(args, train_loader)
    log = MetricsLog(accelerator, args.output_dir, resume_step=step)

    # ---- 4. train: one optimizer step per ga micro-batches ----
    model.train()
    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=not accelerator.is_main_process,
        desc="reward_model",
    )
    window = torch.zeros(5, device=accelerator.device)  # loss, correct, margin sums; pairs, tokens
    window_start, last_eval = time.time(), None
    STOP.deferred = True  # a signal now stops the loop at the end of a step (StopSignal)
    steps = training_steps(accelerator, train_loader, ga, step, steps_per_epoch, total_steps)
    for step, micro in steps:
        window += reward_model_step(accelerator, args, model, optimizer, scheduler, micro, step)
        bar.update(1)

        # ---- log, evaluate, save ----
        if step % args.logging_steps == 0 or step == total_steps:
            window_start = log_reward_window(
                log, bar, window, window_start, scheduler, step, steps_per_epoch
            )
        if evals and (step % args.eval_steps == 0 or step == total_steps):
            last_eval = evaluate_rewards(
                accelerator, model, eval_loader, args.center_rewards_coefficient
            )
            log.log(last_eval, step)
        state = {"scheduler": scheduler.state_dict()}
        checkpoint_or_stop(accelerator, args, step, total_steps, state)
    bar.close()

    # ---- 5. reward statistics (for later stages to normalize scores) and save ----
    n_pairs = len(evals or train)
    final_reward_statistics(accelerator, args, model, eval_loader, last_eval, n_pairs, split, step)
    save_model(accelerator, model, tokenizer, args.output_dir)
    end_training(accelerator)


# ---- this stage's plumbing (not shared) ----


def check_reward_args(args: Args):
    """Argument mistakes, one line each, before anything loads."""
    positive = ("per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "logging_steps", "eval_steps", "max_length")  # fmt: skip
    check_common_args(args, positive)
    if args.max_steps <= 0 and not args.num_train_epochs > 0:
        raise DataError(
            f"--num_train_epochs must be > 0 (or --max_steps set), got {args.num_train_epochs}"
        )
    if not args.center_rewards_coefficient >= 0:
        raise DataError(
            f"--center_rewards_coefficient must be >= 0, got {args.center_rewards_coefficient}"
        )
    if args.eval_only:
        out = Path(args.output_dir)
        if (out / "args.json").exists() or (
            out.exists() and out.resolve() == Path(args.model_name_or_path).resolve()
        ):
            raise DataError(
                f"--eval_only writes eval_results.json into --output_dir, and {out} holds a run or the "
                "model being scored; pass another --output_dir"
            )


def load_reward_model(args, tokenizer):
    """AutoModelForSequenceClassification with one output, float32 weights and dropout off. Returns
    (model, fresh_head): fresh_head is True when the checkpoint had no `score` head (a causal LM, e.g.
    the SFT model)."""
    model, info = load_pretrained(
        AutoModelForSequenceClassification,
        args.model_name_or_path,
        torch.float32,
        args,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        output_loading_info=True,
    )
    disable_dropout(model)
    if not isinstance(getattr(model, "score", None), torch.nn.Linear):
        raise DataError(
            f"{type(model).__name__} has no linear `score` head (the reward-model contract reads it)"
        )
    return model, any(k.startswith("score.") for k in info["missing_keys"])


def save_reward_statistics(accelerator, metrics: dict, n_pairs: int, split: str, output_dir, step):
    """Checks the reward mean and std are finite (never a NaN in the saved config), then writes
    eval_results.json. -> [reward_mean, reward_std]"""
    stats = torch.tensor([metrics["eval/reward_mean"], metrics["eval/reward_std"]])
    check_finite(stats, "eval/reward", step)
    on_main(accelerator, write_eval_results, metrics, n_pairs, split, output_dir)
    return stats.tolist()


def write_eval_results(metrics: dict, n_pairs: int, split: str, output_dir):
    """eval_results.json: the final eval metrics and the reward statistics later stages normalize by."""
    results = {
        **metrics,
        "num_pairs": n_pairs,
        "split": split,
        "reward_mean": metrics["eval/reward_mean"],
        "reward_std": metrics["eval/reward_std"],
    }
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "eval_results.json").write_text(json.dumps(results, indent=2))


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


def prepare_training(accelerator, args, model, tokenizer, train_loader, eval_loader, resume_from):
    """AdamW, accelerate's prepare (with DeepSpeed's settings), checkpoints that also open with
    from_pretrained, the learning-rate schedule, and the step a resume continues from (accelerate's
    state, plus our own step and scheduler from step.json).
    -> (model, optimizer, scheduler, train_loader, eval_loader, step)"""
    optimizer = adamw(
        accelerator, model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay
    )
    model, optimizer, train_loader, eval_loader = prepare_for_training(
        accelerator, args.max_grad_norm, model, optimizer, train_loader, eval_loader
    )
    checkpoints_open_as_models(accelerator, tokenizer, lambda m: {"": ("", m)})
    total_steps = count_steps(args, train_loader)[1]
    # not prepared: accelerate would step it once per process
    scheduler = lr_schedule(optimizer, args.lr_scheduler, args.warmup_ratio, total_steps)
    step = 0
    if resume_from is not None:
        restore = lambda state: scheduler.load_state_dict(state["scheduler"])
        step = load_checkpoint(accelerator, resume_from, restore)["step"]
    return model, optimizer, scheduler, train_loader, eval_loader, step


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
