"""Supervised fine-tuning (SFT): the first stage of RLHF.

The pre-trained model imitates demonstrations (Xu et al. 2024, Sec. 3 "SFT"). The loss is the
negative log-likelihood of the completion tokens only; prompt and padding tokens carry no loss.
Preference datasets are accepted too and train on the preferred response, which is the paper's
"SFT (Safe)" step (Sec. 4.3, Table 2): fine-tuning on the preference data's own responses reduces
the distribution shift that hurts DPO.

    python sft.py --model_name_or_path EleutherAI/pythia-160m --dataset_name trl-lib/tldr
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml sft.py ...

Self-contained on purpose: the small helpers below are repeated, byte-identical, in every script.
"""

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Literal, Optional

import torch
import tyro
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, set_seed
from datasets import Dataset, load_dataset
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, get_scheduler


@dataclass
class Args:
    # ---- model and data ----
    model_name_or_path: str = "EleutherAI/pythia-160m"
    """hub id or local directory of the causal LM to fine-tune"""
    tokenizer_name_or_path: Optional[str] = None
    """tokenizer to use (defaults to model_name_or_path)"""
    init_from_scratch: bool = False
    """build the model from the config at model_name_or_path with fresh random weights"""
    trust_remote_code: bool = False
    """allow model/tokenizer code from the hub to run (opt-in)"""
    dataset_name: str = "trl-lib/tldr"
    """hub id, or a local .json/.jsonl/.parquet file or a directory of them (files named after splits)"""
    dataset_config: Optional[str] = None
    """hub dataset configuration name"""
    train_split: str = "train"
    """split to train on; slicing works, e.g. 'train[:90%]'"""
    eval_split: Optional[str] = None
    """split for eval loss and samples, e.g. 'test' or 'train[90%:]' (None: no evaluation)"""
    filter: Literal["none", "dual_safe", "dual_unsafe"] = "none"
    """SafeRLHF-style data: drop pairs where both responses are safe / both unsafe (paper Table 2)"""
    max_length: int = 512
    """maximum tokens of prompt + completion"""
    max_prompt_length: Optional[int] = None
    """prompts longer than this keep their last tokens (None: prompts are not truncated)"""
    # ---- optimization ----
    seed: int = 1
    """random seed (model init, data order)"""
    learning_rate: float = 2e-5
    """peak learning rate of AdamW"""
    lr_scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    """learning-rate schedule after warmup"""
    warmup_ratio: float = 0.03
    """fraction of the optimizer steps spent warming up linearly"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    num_train_epochs: float = 1.0
    """passes over the training set"""
    max_steps: int = -1
    """total optimizer steps; overrides num_train_epochs when > 0"""
    per_device_train_batch_size: int = 8
    """sequences per device per micro-batch"""
    per_device_eval_batch_size: int = 8
    """sequences per device per eval batch"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    bf16: bool = False
    """train in bfloat16 mixed precision"""
    gradient_checkpointing: bool = False
    """trade compute for memory by recomputing activations"""
    # ---- logging, evaluation, saving ----
    output_dir: str = "outputs/sft"
    """where the model, args.json, metrics.jsonl, samples.jsonl and checkpoints/ go"""
    logging_steps: int = 10
    """log train metrics every this many optimizer steps"""
    eval_steps: int = 100
    """evaluate every this many optimizer steps (and at the end)"""
    save_steps: int = 500
    """write a resumable checkpoint every this many optimizer steps (0: never)"""
    resume_from_checkpoint: Optional[str] = None
    """'latest' or a path to output_dir/checkpoints/step_N to continue from"""
    num_samples: int = 4
    """eval prompts whose greedy completions are written to samples.jsonl at each eval"""
    max_new_tokens: int = 64
    """length of those sample completions"""
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


# ---------------------------------------------------------------------------------------------
# ---- SFT data ----
# ---------------------------------------------------------------------------------------------


def to_sft(ds: Dataset, filter: str = "none") -> Dataset:
    """prompt+completion and messages pass through; preference data trains on its chosen response."""
    cols = set(ds.column_names)
    if {"prompt", "completion"} <= cols:
        return ds.select_columns(["prompt", "completion"])
    if "messages" in cols:
        return ds.select_columns(["messages"])
    try:
        pref = to_preference(ds, filter)
    except DataError as e:
        if "expected one of" not in str(e):
            raise
        raise DataError(f"dataset has columns {sorted(cols)}; expected one of: prompt+completion, messages, "
                        "or a preference shape (prompt+chosen+rejected, chosen+rejected, SafeRLHF)") from None
    return pref.rename_column("chosen", "completion").select_columns(["prompt", "completion"])


def encode_conversation(tokenizer, messages: list):
    """Token ids and a 0/1 loss mask for a whole conversation: only assistant turns carry loss."""
    ids, mask, done = [], [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        after = render_chat(tokenizer, messages[: i + 1])
        if not (before.startswith(done) and after.startswith(before)):
            raise DataError("chat template renders earlier turns differently as the conversation grows")
        context = tokenizer(before[len(done):], add_special_tokens=False).input_ids
        reply = tokenizer(after[len(before):], add_special_tokens=False).input_ids
        ids, mask, done = ids + context + reply, mask + [0] * len(context) + [1] * len(reply), after
    if ids and mask[-1] == 1 and ids[-1] != tokenizer.eos_token_id:
        ids, mask = ids + [tokenizer.eos_token_id], mask + [1]
    return ids, mask


def tokenize_sft(ds: Dataset, tokenizer, max_length: int, max_prompt_length: Optional[int], name: str) -> list:
    """-> list of {input_ids, loss_mask}; logs how many examples were truncated or dropped."""
    examples, n_truncated, n_dropped = [], 0, 0
    for row in ds:
        if "messages" in row:
            ids, mask = encode_conversation(tokenizer, row["messages"])
            if len(ids) > max_length:
                ids, mask, n_truncated = ids[:max_length], mask[:max_length], n_truncated + 1
            if sum(mask) == 0:
                n_dropped += 1
                continue
        else:
            prompt_ids = encode_prompt(tokenizer, row["prompt"])
            out = truncate(prompt_ids, encode_completion(tokenizer, row["prompt"], row["completion"]),
                           max_length, max_prompt_length)
            if out is None:
                n_dropped += 1
                continue
            prompt_ids, completion_ids, was_truncated = out
            n_truncated += was_truncated
            ids, mask = prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)
        examples.append({"input_ids": ids, "loss_mask": mask})
    print(f"{name}: {len(examples)} examples, {n_truncated} truncated, "
          f"{n_dropped} dropped (prompt leaves no room for a completion within max_length={max_length})")
    if not examples:
        raise DataError(f"{name}: no example left after truncation (every prompt exceeds max_length={max_length})")
    return examples


def collate_sft(examples: list, pad_id: int) -> dict:
    """Right-padded batch; loss_mask marks completion tokens (prompt and padding carry no loss)."""
    input_ids = pad([e["input_ids"] for e in examples], pad_id)
    attention_mask = pad([[1] * len(e["input_ids"]) for e in examples], 0)
    loss_mask = pad([e["loss_mask"] for e in examples], 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def sft_loss_sum(model, batch):
    """Summed next-token NLL over completion tokens, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=position_ids_from(batch["attention_mask"])).logits
    logps = token_logprobs(logits[:, :-1], batch["input_ids"][:, 1:])
    mask = batch["loss_mask"][:, 1:].float()
    return -(logps * mask).sum(), mask.sum()


# ---------------------------------------------------------------------------------------------
# ---- main ----
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(accelerator, model, loader):
    model.eval()
    total = torch.zeros(2, device=accelerator.device)
    for batch in loader:
        loss_sum, n = sft_loss_sum(model, batch)
        total += torch.stack([loss_sum, n])
    total = accelerator.reduce(total, "sum")
    model.train()
    loss = (total[0] / total[1]).item()
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}


@torch.no_grad()
def write_samples(accelerator, model, tokenizer, prompts: list, args, step: int):
    """Greedy completions of a few eval prompts, left-padded and batched, to samples.jsonl."""
    if not prompts:
        return
    model.eval()
    batch = {"input_ids": pad(prompts, tokenizer.pad_token_id, "left"),
             "attention_mask": pad([[1] * len(p) for p in prompts], 0, "left")}
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    zero3 = accelerator.state.deepspeed_plugin is not None and accelerator.state.deepspeed_plugin.zero_stage == 3
    out = accelerator.unwrap_model(model).generate(
        **batch, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, synced_gpus=zero3)
    model.train()
    if accelerator.is_main_process:
        with open(Path(args.output_dir) / "samples.jsonl", "a") as f:
            for p, o in zip(prompts, out[:, batch["input_ids"].shape[1]:]):
                f.write(json.dumps({"step": step, "prompt": tokenizer.decode(p, skip_special_tokens=True),
                                    "completion": tokenizer.decode(o, skip_special_tokens=True)}) + "\n")


def main(args: Args):
    # ---- validate arguments and data before any model is loaded ----
    if args.per_device_train_batch_size < 1 or args.gradient_accumulation_steps < 1:
        raise DataError("per_device_train_batch_size and gradient_accumulation_steps must be >= 1")
    accelerator = Accelerator(
        mixed_precision="bf16" if args.bf16 else None,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
    )
    set_seed(args.seed)
    tokenizer = load_tokenizer(args)
    train = tokenize_sft(to_sft(load_split(args.dataset_name, args.dataset_config, args.train_split), args.filter),
                         tokenizer, args.max_length, args.max_prompt_length, "train")
    evals = []
    if args.eval_split:
        evals = tokenize_sft(to_sft(load_split(args.dataset_name, args.dataset_config, args.eval_split), args.filter),
                             tokenizer, args.max_length, args.max_prompt_length, "eval")
    resume_from = find_checkpoint(args.output_dir, args.resume_from_checkpoint)

    # ---- model ----
    if args.init_from_scratch:
        config = AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=args.trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)

    collate = lambda examples: collate_sft(examples, tokenizer.pad_token_id)  # noqa: E731
    train_loader = torch.utils.data.DataLoader(train, batch_size=args.per_device_train_batch_size, shuffle=True,
                                               collate_fn=collate)
    eval_loader = torch.utils.data.DataLoader(evals, batch_size=args.per_device_eval_batch_size, collate_fn=collate)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)

    # ---- batch arithmetic: one optimizer step = per_device batch x processes x accumulation ----
    ga = args.gradient_accumulation_steps
    steps_per_epoch = len(train_loader) // ga  # an incomplete trailing accumulation group is skipped
    if steps_per_epoch == 0:
        raise DataError(f"{len(train)} training examples make no full step of "
                        f"{args.per_device_train_batch_size} x {accelerator.num_processes} x {ga}")
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=math.ceil(args.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    # Not prepared: accelerate would step it once per process; checkpointed all the same.
    accelerator.register_for_checkpointing(scheduler)

    step = 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        step = json.loads((resume_from / "step.json").read_text())["step"]
        accelerator.print(f"resumed from {resume_from} at step {step}")
    if accelerator.is_main_process:
        write_args(args, args.output_dir)
    accelerator.init_trackers("sft", config=asdict(args))
    log = MetricsLog(accelerator, args.output_dir)
    sample_prompts = [e["input_ids"][: e["loss_mask"].index(1)] for e in evals[: args.num_samples] if 1 in e["loss_mask"]]

    # ---- training loop ----
    model.train()
    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_main_process, desc="sft")
    window_loss, window_loss_tokens, window_tokens, window_start = 0.0, 0.0, 0, time.time()
    while step < total_steps:
        epoch = step // steps_per_epoch
        train_loader.set_epoch(epoch)  # the same data order on every process and after a resume
        skip = (step % steps_per_epoch) * ga
        batches = iter(accelerator.skip_first_batches(train_loader, skip) if skip else train_loader)
        for _ in range(steps_per_epoch - step % steps_per_epoch):
            micro = list(islice(batches, ga))
            # Normalize by the completion tokens of the whole global batch, so 1 process and N processes
            # (and any accumulation) give the same gradient; DDP averages over processes, hence the factor.
            n_tokens = accelerator.gather(sum(b["loss_mask"][:, 1:].sum() for b in micro)).sum().clamp(min=1)
            for batch in micro:
                with accelerator.accumulate(model):
                    loss_sum, _ = sft_loss_sum(model, batch)
                    accelerator.backward(loss_sum * accelerator.num_processes * ga / n_tokens)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad()
                # summed locally; reduced across processes only when logging (no sync per micro-batch)
                window_loss += loss_sum.detach()
                window_tokens += batch["attention_mask"].sum()
            window_loss_tokens += n_tokens.item()
            step += 1
            bar.update(1)

            if step % args.logging_steps == 0 or step == total_steps:
                elapsed = time.time() - window_start
                window_loss, window_tokens = accelerator.reduce(torch.stack([window_loss, window_tokens.float()]), "sum")
                metrics = {"train/loss": window_loss.item() / window_loss_tokens,  # per completion token
                           "train/lr": scheduler.get_last_lr()[0],
                           "train/tokens_per_second": window_tokens.item() / max(elapsed, 1e-9),
                           "epoch": step / steps_per_epoch}
                log.log(metrics, step)
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", tok_s=f"{metrics['train/tokens_per_second']:.0f}")
                window_loss, window_loss_tokens, window_tokens, window_start = 0.0, 0.0, 0, time.time()
            if evals and (step % args.eval_steps == 0 or step == total_steps):
                log.log(evaluate(accelerator, model, eval_loader), step)
                write_samples(accelerator, model, tokenizer, sample_prompts, args, step)
            if args.save_steps > 0 and step % args.save_steps == 0 and step < total_steps:
                save_checkpoint(accelerator, args.output_dir, step)
            if step >= total_steps:
                break
    bar.close()

    # ---- save ----
    save_model(accelerator, model, tokenizer, args.output_dir)
    accelerator.end_training()


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except DataError as e:
        sys.exit(f"error: {e}")
