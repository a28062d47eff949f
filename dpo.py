"""Direct Preference Optimization (DPO), its common variants, and iterative DPO (DPO-Iter).

DPO trains the policy on preference pairs directly, with no reward model and no sampling (Xu et al.
2024, Sec. 3, Eq. 7): the implicit reward of a response is beta * log(pi_theta(y|x) / pi_ref(y|x))
(Eq. 6), and the loss is the Bradley-Terry likelihood of the preferred response under that reward.
Variants: IPO (a squared loss that does not push margins to infinity) and conservative DPO (cDPO,
label smoothing for noisy labels). DPO-Iter (Sec. 4.3, Table 2) fixes DPO's distribution shift: each
iteration samples responses from the current policy, labels the best and worst of each prompt with a
reward model or a reward function, trains DPO on those pairs, and makes the trained policy the next
iteration's reference.

    python dpo.py --model_name_or_path EleutherAI/pythia-160m --dataset_name trl-lib/ultrafeedback_binarized
    python dpo.py --model_name_or_path my-sft --dataset_name prompts.jsonl --iterations 3 \
        --reward_model_name_or_path my-reward-model
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml dpo.py ...

Self-contained on purpose: the small helpers below are repeated, byte-identical, in every script.
"""

import copy
import gc
import hashlib
import importlib.util
import json
import math
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
import tyro
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, gather_object, set_seed
from datasets import Dataset, load_dataset
from tqdm.auto import tqdm
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          PreTrainedModel, get_scheduler)


@dataclass
class Args:
    # ---- model and data ----
    model_name_or_path: str = "EleutherAI/pythia-160m"
    """hub id or local directory of the policy to train (usually an SFT model)"""
    ref_model_name_or_path: Optional[str] = None
    """reference model pi_ref (defaults to a frozen copy of the initial policy)"""
    tokenizer_name_or_path: Optional[str] = None
    """tokenizer to use (defaults to model_name_or_path)"""
    trust_remote_code: bool = False
    """allow model/tokenizer code from the hub to run (opt-in)"""
    dataset_name: str = "trl-lib/ultrafeedback_binarized"
    """hub id, or a local .json/.jsonl/.parquet file or a directory of them: preference pairs (or, for DPO-Iter, any prompt source)"""
    dataset_config: Optional[str] = None
    """hub dataset configuration name"""
    train_split: str = "train"
    """split to train on; slicing works, e.g. 'train[:90%]'"""
    eval_split: Optional[str] = None
    """split for the eval/ metrics, e.g. 'test' or 'train[90%:]' (None: no evaluation)"""
    filter: Literal["none", "dual_safe", "dual_unsafe"] = "none"
    """SafeRLHF-style data: drop pairs where both responses are safe / both unsafe (paper Table 2)"""
    max_length: int = 512
    """maximum tokens of prompt + response"""
    max_prompt_length: Optional[int] = None
    """prompts longer than this keep their last tokens (None: prompts are not truncated)"""
    # ---- DPO loss ----
    beta: float = 0.1
    """strength of the implicit KL penalty towards the reference (paper Appendix A.1: 0.1)"""
    loss_type: Literal["sigmoid", "ipo", "cdpo"] = "sigmoid"
    """sigmoid: DPO (Eq. 7); ipo: (h - 1/(2 beta))^2; cdpo: conservative DPO with label_smoothing"""
    label_smoothing: float = 0.0
    """cdpo (and sigmoid): assumed fraction of flipped preference labels, in [0, 0.5)"""
    precompute_ref_logps: bool = False
    """compute reference log-probs once before training, so no reference model stays in memory"""
    eval_only: bool = False
    """evaluate the policy against its reference on eval_split, write the eval/ metrics, and stop"""
    eval_on_start: bool = True
    """also evaluate before the first step (the baseline: policy = reference, every margin 0)"""
    # ---- DPO-Iter (paper Sec. 4.3) ----
    iterations: int = 1
    """DPO-Iter rounds of sample -> label -> train (> 1 needs a reward model or a reward function)"""
    reward_model_name_or_path: Optional[str] = None
    """reward model (a reward_model.py checkpoint) that labels sampled responses: turns on DPO-Iter"""
    reward_fn: Optional[str] = None
    """'path/to/file.py:function', (prompts, completions) -> list[float], instead of a reward model"""
    samples_per_prompt: int = 4
    """responses sampled per prompt; the best and the worst form a pair (ties are skipped)"""
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
    """preference pairs per device per eval batch (and per reference-log-prob batch)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    bf16: bool = False
    """train in bfloat16 mixed precision"""
    gradient_checkpointing: bool = False
    """trade compute for memory by recomputing activations"""
    # ---- logging, evaluation, saving ----
    output_dir: str = "outputs/dpo"
    """where the model, args.json, metrics.jsonl, checkpoints/ and DPO-Iter's iter_K/ go"""
    logging_steps: int = 10
    """log train metrics every this many optimizer steps"""
    eval_steps: int = 100
    """evaluate every this many optimizer steps (and at the end)"""
    save_steps: int = 500
    """write a resumable checkpoint every this many optimizer steps (0: never; DPO-Iter saves iter_K instead)"""
    resume_from_checkpoint: Optional[str] = None
    """'latest' or a path to output_dir/checkpoints/step_N (DPO-Iter: 'latest' restarts after the last saved iter_K)"""
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
# ---- the DPO loss (pure functions) ----
# ---------------------------------------------------------------------------------------------


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) = sum of the completion tokens' log-probabilities; prompt and padding count nothing.
    logits[:, t] predicts input_ids[:, t + 1], hence the shift. -> [B]"""
    logps = token_logprobs(logits[:, :-1], input_ids[:, 1:])
    return (logps * completion_mask[:, 1:]).sum(-1)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """Per-pair losses and the implicit rewards of chosen and rejected responses (all [B]).

    Eq. 6: the reward a policy implies is r(x, y) = beta * log(pi_theta(y|x) / pi_ref(y|x)) (+ C(x)).
    Eq. 7: DPO is the Bradley-Terry loss of that reward, -log sigmoid(beta * h), where
    h = log(pi_theta(y_w)/pi_ref(y_w)) - log(pi_theta(y_l)/pi_ref(y_l)).
    cdpo: conservative DPO assumes a fraction label_smoothing of the labels is flipped,
    -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h) (also applied by 'sigmoid' when eps > 0).
    ipo: (h - 1/(2 beta))^2 regresses the margin to a finite target instead of pushing it to infinity.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type in ("sigmoid", "cdpo"):
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    # Eq. 6: the implicit rewards, for logging only (no gradient flows through them).
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def concatenated_forward(model, batch: dict):
    """log pi(y_w|x) and log pi(y_l|x) from ONE forward pass: the batch holds the chosen rows, then the
    rejected rows (one padding width, and under FSDP/ZeRO-3 one gather of the weights instead of two)."""
    mask = batch["attention_mask"]
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids_from(mask)).logits
    logps = sequence_logps(logits, batch["input_ids"], batch["completion_mask"])
    n = logps.shape[0] // 2
    return logps[:n], logps[n:]


# ---------------------------------------------------------------------------------------------
# ---- data: preference pairs ----
# ---------------------------------------------------------------------------------------------


def make_pair(prompt_ids: list, chosen_ids: list, rejected_ids: list, max_length: int,
              max_prompt_length: Optional[int]):
    """-> ({chosen_input_ids, chosen_mask, rejected_input_ids, rejected_mask}, truncated) or None when the
    prompt leaves no room for a response. Both responses share the same (equally truncated) prompt."""
    c = truncate(prompt_ids, chosen_ids, max_length, max_prompt_length)
    r = truncate(prompt_ids, rejected_ids, max_length, max_prompt_length)
    if c is None or r is None:
        return None
    (p, c_ids, c_trunc), (_, r_ids, r_trunc) = c, r
    pair = {"chosen_input_ids": p + c_ids, "chosen_mask": [0] * len(p) + [1] * len(c_ids),
            "rejected_input_ids": p + r_ids, "rejected_mask": [0] * len(p) + [1] * len(r_ids)}
    return pair, c_trunc or r_trunc


def tokenize_preference(ds: Dataset, tokenizer, max_length: int, max_prompt_length: Optional[int], name: str) -> list:
    """prompt/chosen/rejected rows -> list of pairs; logs how many were truncated or dropped."""
    pairs, n_truncated, n_dropped = [], 0, 0
    for row in ds:
        prompt_ids = encode_prompt(tokenizer, row["prompt"])
        out = make_pair(prompt_ids, encode_completion(tokenizer, row["prompt"], row["chosen"]),
                        encode_completion(tokenizer, row["prompt"], row["rejected"]), max_length, max_prompt_length)
        if out is None:
            n_dropped += 1
            continue
        pairs.append(out[0])
        n_truncated += out[1]
    print(f"{name}: {len(pairs)} pairs, {n_truncated} truncated, "
          f"{n_dropped} dropped (prompt leaves no room for a response within max_length={max_length})")
    if not pairs:
        raise DataError(f"{name}: no pair left after truncation (every prompt exceeds max_length={max_length})")
    return pairs


def collate_pairs(pairs: list, pad_id: int) -> dict:
    """Right-padded batch of 2B rows: the B chosen sequences, then the B rejected ones (concatenated
    forward); completion_mask marks response tokens. Precomputed reference log-probs ride along."""
    seqs = [p["chosen_input_ids"] for p in pairs] + [p["rejected_input_ids"] for p in pairs]
    masks = [p["chosen_mask"] for p in pairs] + [p["rejected_mask"] for p in pairs]
    batch = {"input_ids": pad(seqs, pad_id), "attention_mask": pad([[1] * len(s) for s in seqs], 0),
             "completion_mask": pad(masks, 0)}
    if "ref_chosen_logps" in pairs[0]:
        batch["ref_chosen_logps"] = torch.tensor([p["ref_chosen_logps"] for p in pairs])
        batch["ref_rejected_logps"] = torch.tensor([p["ref_rejected_logps"] for p in pairs])
    return batch


# ---------------------------------------------------------------------------------------------
# ---- data: prompts and rewards for DPO-Iter ----
# ---------------------------------------------------------------------------------------------


def to_prompts(ds: Dataset, filter: str = "none") -> list:
    """Any prompt source: a `prompt` column (string or messages), a preference shape, or conversations
    (`messages` up to the last assistant turn)."""
    cols = set(ds.column_names)
    if "prompt" in cols and not {"response_0", "response_1"} <= cols:
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
        raise DataError(f"dataset has columns {sorted(cols)}; expected prompts: a prompt column, messages, or a "
                        "preference shape (prompt+chosen+rejected, chosen+rejected, SafeRLHF)") from None


def tokenize_prompts(prompts: list, tokenizer, max_length: int, max_prompt_length: Optional[int], name: str) -> list:
    """-> list of {prompt, prompt_ids}; prompts keep their end; prompts with no room for a response are dropped."""
    out, n_truncated, n_dropped = [], 0, 0
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt)
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            ids, n_truncated = ids[-max_prompt_length:], n_truncated + 1
        if len(ids) >= max_length:
            n_dropped += 1
            continue
        out.append({"prompt": prompt, "prompt_ids": ids})
    print(f"{name}: {len(out)} prompts, {n_truncated} truncated, "
          f"{n_dropped} dropped (prompt leaves no room for a response within max_length={max_length})")
    if not out:
        raise DataError(f"{name}: no prompt left after truncation (every prompt exceeds max_length={max_length})")
    return out


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
        raise DataError(f"--reward_fn {spec!r}: cannot import {path} ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise DataError(f"--reward_fn {spec!r}: {path} has no function {name!r}")
    return fn


def call_reward_fn(fn, prompts: list, completions: list) -> list:
    scores = fn(prompts, completions)
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise DataError(f"--reward_fn must return a list of numbers; it returned {type(scores).__name__}") from None
    if len(scores) != len(completions):
        raise DataError(f"--reward_fn returned {len(scores)} scores for {len(completions)} completions")
    return scores


def best_worst_pairs(scores: list, k: int):
    """Per prompt (k consecutive samples): (best index, worst index), or None when all k scores tie."""
    out = []
    for start in range(0, len(scores), k):
        group = scores[start:start + k]
        best, worst = max(range(k), key=group.__getitem__), min(range(k), key=group.__getitem__)
        out.append(None if group[best] == group[worst] else (start + best, start + worst))
    return out


def first_eos_cut(ids: list, eos_id: int):
    """A sampled response up to and including its first EOS (later positions are padding) -> (ids, finished)."""
    return (ids[: ids.index(eos_id) + 1], True) if eos_id in ids else (ids, False)


# ---------------------------------------------------------------------------------------------
# ---- models ----
# ---------------------------------------------------------------------------------------------


def disable_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def freeze(model):
    """Frozen models (reference, reward): eval mode, no gradients, no optimizer."""
    return disable_dropout(model).eval().requires_grad_(False)


def models_in_memory() -> int:
    """How many distinct transformers models this process holds (a model's sub-models share its first
    weight, so they count once). With --precompute_ref_logps it is 1 during training: the policy alone."""
    gc.collect()
    storages = set()
    with warnings.catch_warnings():  # isinstance() touches deprecated objects, which warn
        warnings.simplefilter("ignore")
        models = [obj for obj in gc.get_objects() if isinstance(obj, PreTrainedModel)]
    for model in models:
        first = next(model.parameters(), None)
        if first is not None:
            storages.add(first.data_ptr())
    return len(storages)


def weights_sha256(model) -> str:
    """A fingerprint of a model's weights: DPO-Iter records its reference's, so a test can compare it with
    the previous iteration's saved policy."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def compute_ref_logps(accelerator, model, pairs: list, batch_size: int, pad_id: int):
    """Reference log-probs of every pair, computed once, in batches, each process a share; stored in the pairs."""
    if not pairs:
        return
    was_training = model.training
    model.eval()
    results = []
    with accelerator.split_between_processes(list(range(len(pairs))), apply_padding=True) as mine:
        for start in range(0, len(mine), batch_size):
            idx = mine[start:start + batch_size]
            batch = {k: v.to(accelerator.device) for k, v in collate_pairs([pairs[i] for i in idx], pad_id).items()}
            with accelerator.autocast():
                chosen, rejected = concatenated_forward(model, batch)
            results += list(zip(idx, chosen.float().tolist(), rejected.float().tolist()))
    for i, chosen, rejected in gather_object(results):
        pairs[i]["ref_chosen_logps"], pairs[i]["ref_rejected_logps"] = chosen, rejected
    model.train(was_training)


# ---------------------------------------------------------------------------------------------
# ---- DPO-Iter: sample, label, pair ----
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_responses(accelerator, model, tokenizer, prompt_ids: list, args) -> list:
    """args.samples_per_prompt responses per prompt: batched, left-padded, KV cache, no gradients.
    -> per prompt, k lists of response ids (cut after the first EOS) and whether each finished."""
    model.eval()
    zero3 = accelerator.state.deepspeed_plugin is not None and accelerator.state.deepspeed_plugin.zero_stage == 3
    out = []
    for start in range(0, len(prompt_ids), args.generation_batch_size):
        chunk = prompt_ids[start:start + args.generation_batch_size]
        batch = {"input_ids": pad(chunk, tokenizer.pad_token_id, "left").to(accelerator.device),
                 "attention_mask": pad([[1] * len(p) for p in chunk], 0, "left").to(accelerator.device)}
        generated = accelerator.unwrap_model(model).generate(
            **batch, do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            max_new_tokens=args.max_new_tokens, num_return_sequences=args.samples_per_prompt, use_cache=True,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, synced_gpus=zero3)
        responses = generated[:, batch["input_ids"].shape[1]:].tolist()  # rows: prompt-major, k per prompt
        out += [first_eos_cut(r, tokenizer.eos_token_id) for r in responses]
    model.train()
    return out


@torch.no_grad()
def reward_model_scores(accelerator, reward_model, rm_tokenizer, sequences: list, batch_size: int) -> list:
    """Reward of each token sequence: the score head at its last real token (the contract helpers)."""
    scores = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        ids = pad(chunk, rm_tokenizer.pad_token_id).to(accelerator.device)
        mask = pad([[1] * len(s) for s in chunk], 0).to(accelerator.device)
        with accelerator.autocast():
            per_token = score_tokens(reward_model, ids, mask)
        scores += per_token[torch.arange(len(chunk)), last_token_index(mask)].float().tolist()
    return scores


def reward_model_inputs(tokenizer, rm_tokenizer, prompt, prompt_ids: list, response_ids: list, finished: bool) -> list:
    """The reward model's token ids for prompt + response. The same vocabulary: the ids as sampled;
    otherwise the decoded response is re-tokenized with the reward model's tokenizer (and its chat template)."""
    if rm_tokenizer.get_vocab() == tokenizer.get_vocab():
        return prompt_ids + response_ids
    text = tokenizer.decode(response_ids, skip_special_tokens=True)
    if isinstance(prompt, list):
        text = [{"role": "assistant", "content": text}]
    ids = encode_prompt(rm_tokenizer, prompt) + encode_completion(rm_tokenizer, prompt, text)
    return ids if finished else ids[:-1]  # an unfinished response gets no EOS


def prompt_text(tokenizer, prompt) -> str:
    return render_chat(tokenizer, prompt, add_generation_prompt=True) if isinstance(prompt, list) else prompt


def build_iteration_pairs(accelerator, policy, tokenizer, prompts: list, scorer, args, name: str):
    """Paper Sec. 4.3 (DPO-Iter): sample from the current policy, score every response, and pair each
    prompt's best response (chosen) with its worst (rejected); prompts whose samples all tie are skipped."""
    k = args.samples_per_prompt
    with accelerator.split_between_processes(list(range(len(prompts))), apply_padding=True) as mine:
        samples = sample_responses(accelerator, policy, tokenizer, [prompts[i]["prompt_ids"] for i in mine], args)
        owners = [i for i in mine for _ in range(k)]
        scores = scorer([prompts[i] for i in owners], samples)
        local = [(owners[j], samples[j][0], samples[j][1], scores[j]) for j in range(len(samples))]
    by_prompt = {}
    for i, ids, finished, score in gather_object(local):  # padding duplicated some prompts: keep one copy
        by_prompt.setdefault(i, []).append((ids, finished, score))
    pairs, n_truncated, n_dropped, n_ties, all_scores = [], 0, 0, 0, []
    for i in sorted(by_prompt):
        group = by_prompt[i][:k]
        all_scores += [s for _, _, s in group]
        choice = best_worst_pairs([s for _, _, s in group], k)[0]
        if choice is None:
            n_ties += 1
            continue
        out = make_pair(prompts[i]["prompt_ids"], group[choice[0]][0], group[choice[1]][0], args.max_length, None)
        if out is None:
            n_dropped += 1
            continue
        (best_ids, _, best), (worst_ids, _, worst) = group[choice[0]], group[choice[1]]
        out[0]["record"] = {"prompt": prompt_text(tokenizer, prompts[i]["prompt"]),  # for iter_K/pairs.jsonl
                            "chosen": tokenizer.decode(best_ids, skip_special_tokens=True), "chosen_score": best,
                            "rejected": tokenizer.decode(worst_ids, skip_special_tokens=True), "rejected_score": worst}
        pairs.append(out[0])
        n_truncated += out[1]
    accelerator.print(f"{name}: {len(pairs)} pairs from {len(by_prompt)} prompts x {k} samples, "
                      f"{n_ties} skipped (all samples tied), {n_truncated} truncated, {n_dropped} dropped")
    stats = {"pairs": len(pairs), "ties_skipped": n_ties, "scores_mean": sum(all_scores) / len(all_scores)}
    if not pairs:
        raise DataError(f"{name}: every prompt's {k} samples got the same score; no preference pair to train on")
    return pairs, stats


def make_scorer(accelerator, args, tokenizer, reward_fn, reward_model, rm_tokenizer):
    """(prompts, samples) -> scores, from the reward function or the reward model."""
    def score(prompts, samples):
        if reward_fn is not None:
            return call_reward_fn(reward_fn, [prompt_text(tokenizer, p["prompt"]) for p in prompts],
                                  [tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in samples])
        sequences = [reward_model_inputs(tokenizer, rm_tokenizer, p["prompt"], p["prompt_ids"], ids, finished)
                     for p, (ids, finished) in zip(prompts, samples)]
        return reward_model_scores(accelerator, reward_model, rm_tokenizer, sequences, args.per_device_eval_batch_size)
    return score


# ---------------------------------------------------------------------------------------------
# ---- training and evaluation ----
# ---------------------------------------------------------------------------------------------


def pair_stats(model, ref_model, batch, args):
    """Losses [B] and the per-pair statistics that feed the metrics: [B, 7]
    (loss, reward chosen, reward rejected, margin, accuracy, logp chosen, logp rejected)."""
    policy_chosen, policy_rejected = concatenated_forward(model, batch)
    if "ref_chosen_logps" in batch:  # precomputed: no reference model in memory
        ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    else:
        with torch.no_grad():
            ref_chosen, ref_rejected = concatenated_forward(ref_model, batch)
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                                        args.beta, args.loss_type, args.label_smoothing)
    margins = chosen_rewards - rejected_rewards
    stats = torch.stack([losses.detach(), chosen_rewards, rejected_rewards, margins, (margins > 0).float(),
                         policy_chosen.detach(), policy_rejected.detach()], dim=-1)
    return losses, stats


STAT_NAMES = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
              "logps/chosen", "logps/rejected"]


def stat_metrics(total: torch.Tensor, prefix: str) -> dict:
    """[8] = (sums of the 7 statistics, pair count) -> means, named for the ecosystem (DESIGN section 6)."""
    names = [("train/loss" if n == "loss" else n) if prefix == "" else f"eval/{n}" for n in STAT_NAMES]
    return {name: (total[i] / total[-1]).item() for i, name in enumerate(names)}


@torch.no_grad()
def evaluate(accelerator, model, ref_model, loader, args) -> dict:
    model.eval()
    rows = []
    for batch in loader:
        with accelerator.autocast():
            _, stats = pair_stats(model, ref_model, batch, args)
        rows.append(accelerator.gather_for_metrics(stats.float()))
    model.train()
    rows = torch.cat(rows)
    return stat_metrics(torch.cat([rows.sum(0), torch.tensor([len(rows)], device=rows.device)]), "eval")


def train_dpo(args, accelerator, log, tokenizer, policy, ref_model, train: list, evals: list, step: int = 0,
              resume_from: Optional[Path] = None, checkpoints: bool = True, save_to: Optional[str] = None):
    """One DPO run over fixed pairs; global step numbers continue from `step`. Returns the final step."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    collate = lambda pairs: collate_pairs(pairs, tokenizer.pad_token_id)  # noqa: E731
    train_loader = torch.utils.data.DataLoader(train, batch_size=args.per_device_train_batch_size, shuffle=True,
                                               collate_fn=collate)
    eval_loader = torch.utils.data.DataLoader(evals, batch_size=args.per_device_eval_batch_size, collate_fn=collate)
    policy, optimizer, train_loader, eval_loader = accelerator.prepare(policy, optimizer, train_loader, eval_loader)

    # ---- batch arithmetic: one optimizer step = per_device batch x processes x accumulation ----
    ga = args.gradient_accumulation_steps
    steps_per_epoch = len(train_loader) // ga  # an incomplete trailing accumulation group is skipped
    if steps_per_epoch == 0:
        raise DataError(f"{len(train)} training pairs make no full step of "
                        f"{args.per_device_train_batch_size} x {accelerator.num_processes} x {ga}")
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=math.ceil(args.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    if checkpoints:  # Not prepared: accelerate would step it once per process; checkpointed all the same.
        accelerator.register_for_checkpointing(scheduler)
    start, done = step, 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        done = json.loads((resume_from / "step.json").read_text())["step"] - start
        accelerator.print(f"resumed from {resume_from} at step {start + done}")

    # With --precompute_ref_logps this prints 1: the reference model is gone (a test checks it).
    accelerator.print(f"models held during training: {models_in_memory()}")
    if evals and args.eval_on_start and done == 0:
        log.log(evaluate(accelerator, policy, ref_model, eval_loader, args), start)

    # ---- training loop ----
    policy.train()
    bar = tqdm(total=total_steps, initial=done, disable=not accelerator.is_main_process, desc="dpo")
    window, window_tokens, window_start = torch.zeros(8, device=accelerator.device), 0, time.time()
    while done < total_steps:
        epoch = done // steps_per_epoch
        train_loader.set_epoch(epoch)  # the same data order on every process and after a resume
        skip = (done % steps_per_epoch) * ga
        batches = iter(accelerator.skip_first_batches(train_loader, skip) if skip else train_loader)
        for _ in range(steps_per_epoch - done % steps_per_epoch):
            micro = list(islice(batches, ga))
            # The mean loss over the pairs of the whole global batch, so 1 process and N processes (and any
            # accumulation) give the same gradient; DDP averages over processes, hence the factor.
            n_pairs = accelerator.gather(torch.tensor(sum(len(b["input_ids"]) // 2 for b in micro),
                                                      device=accelerator.device)).sum()
            for batch in micro:
                with accelerator.accumulate(policy):
                    with accelerator.autocast():
                        losses, stats = pair_stats(policy, ref_model, batch, args)
                    accelerator.backward(losses.sum() * accelerator.num_processes * ga / n_pairs)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad()
                window += accelerator.reduce(torch.cat([stats.float().sum(0), torch.ones(1, device=stats.device)
                                                        * len(stats)]), "sum")
                window_tokens += int(accelerator.reduce(batch["attention_mask"].sum(), "sum").item())
            done += 1
            bar.update(1)

            if done % args.logging_steps == 0 or done == total_steps:
                elapsed = max(time.time() - window_start, 1e-9)
                metrics = {**stat_metrics(window, ""), "train/lr": scheduler.get_last_lr()[0],
                           "train/tokens_per_second": window_tokens / elapsed,
                           "train/pairs_per_second": window[-1].item() / elapsed, "epoch": done / steps_per_epoch}
                if torch.cuda.is_available():
                    metrics["train/peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
                log.log(metrics, start + done)
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", acc=f"{metrics['rewards/accuracies']:.2f}",
                                pairs_s=f"{metrics['train/pairs_per_second']:.1f}")
                window, window_tokens, window_start = torch.zeros_like(window), 0, time.time()
            if evals and (done % args.eval_steps == 0 or done == total_steps):
                log.log(evaluate(accelerator, policy, ref_model, eval_loader, args), start + done)
            if checkpoints and args.save_steps > 0 and done % args.save_steps == 0 and done < total_steps:
                save_checkpoint(accelerator, args.output_dir, start + done)
            if done >= total_steps:
                break
    bar.close()
    if save_to is not None:
        save_model(accelerator, policy, tokenizer, save_to)
    return accelerator.unwrap_model(policy), start + done


# ---------------------------------------------------------------------------------------------
# ---- main ----
# ---------------------------------------------------------------------------------------------


def validate(args: Args):
    online = args.reward_model_name_or_path is not None or args.reward_fn is not None
    if args.per_device_train_batch_size < 1 or args.gradient_accumulation_steps < 1 or args.per_device_eval_batch_size < 1:
        raise DataError("per_device_train_batch_size, per_device_eval_batch_size and gradient_accumulation_steps "
                        "must be >= 1")
    if args.beta <= 0:
        raise DataError(f"beta must be > 0, got {args.beta}")
    if not 0 <= args.label_smoothing < 0.5:
        raise DataError(f"label_smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if args.loss_type == "cdpo" and args.label_smoothing == 0:
        raise DataError("loss_type cdpo needs label_smoothing > 0 (the assumed fraction of flipped labels)")
    if args.loss_type == "ipo" and args.label_smoothing > 0:
        raise DataError("label_smoothing applies to sigmoid/cdpo, not to ipo")
    if args.iterations < 1:
        raise DataError(f"iterations must be >= 1, got {args.iterations}")
    if args.reward_model_name_or_path is not None and args.reward_fn is not None:
        raise DataError("give either --reward_model_name_or_path or --reward_fn, not both")
    if args.iterations > 1 and not online:
        raise DataError("--iterations > 1 (DPO-Iter) needs --reward_model_name_or_path or --reward_fn to label samples")
    if online and args.samples_per_prompt < 2:
        raise DataError("DPO-Iter needs --samples_per_prompt >= 2 to form a best/worst pair")
    if args.eval_only and (args.eval_split is None or online):
        raise DataError("--eval_only evaluates preference pairs: it needs --eval_split and no reward model/function")
    return online


def load_policy(path: str, args):
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return disable_dropout(model)


def load_reference(args, accelerator):
    path = args.ref_model_name_or_path or args.model_name_or_path
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    return freeze(model).to(accelerator.device)


def main(args: Args):
    # ---- validate arguments and data before any model is loaded ----
    online = validate(args)
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else None
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
    data = lambda split: load_split(args.dataset_name, args.dataset_config, split)  # noqa: E731
    if online:
        train = tokenize_prompts(to_prompts(data(args.train_split), args.filter), tokenizer, args.max_length,
                                 args.max_prompt_length, "train")
        evals = tokenize_prompts(to_prompts(data(args.eval_split), args.filter), tokenizer, args.max_length,
                                 args.max_prompt_length, "eval") if args.eval_split else []
    else:
        train = [] if args.eval_only else tokenize_preference(
            to_preference(data(args.train_split), args.filter), tokenizer, args.max_length, args.max_prompt_length, "train")
        evals = tokenize_preference(to_preference(data(args.eval_split), args.filter), tokenizer, args.max_length,
                                    args.max_prompt_length, "eval") if args.eval_split else []
    resume_from = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if accelerator.is_main_process:
        write_args(args, args.output_dir)
    accelerator.init_trackers("dpo", config=asdict(args))
    log = MetricsLog(accelerator, args.output_dir)

    if not online:
        # ---- DPO on a fixed preference dataset ----
        policy = load_policy(args.model_name_or_path, args).to(accelerator.device)
        if args.precompute_ref_logps:
            # Reference log-probs once, before training; then no reference model remains in memory.
            # Without --ref_model_name_or_path the reference IS the initial policy: no second model at all.
            t0 = time.time()
            ref_model = load_reference(args, accelerator) if args.ref_model_name_or_path else policy
            for pairs in (train, evals):
                compute_ref_logps(accelerator, ref_model, pairs, args.per_device_eval_batch_size, tokenizer.pad_token_id)
            del ref_model
            gc.collect()
            accelerator.print(f"precomputed reference log-probs of {len(train) + len(evals)} pairs "
                              f"in {time.time() - t0:.1f}s")
            ref_model = None
        else:
            ref_model = load_reference(args, accelerator)
        if args.eval_only:
            policy = accelerator.prepare(policy)
            eval_loader = accelerator.prepare(torch.utils.data.DataLoader(
                evals, batch_size=args.per_device_eval_batch_size,
                collate_fn=lambda pairs: collate_pairs(pairs, tokenizer.pad_token_id)))
            metrics = evaluate(accelerator, policy, ref_model, eval_loader, args)
            log.log(metrics, 0)
            accelerator.print(json.dumps(metrics))
        else:
            train_dpo(args, accelerator, log, tokenizer, policy, ref_model, train, evals,
                      resume_from=resume_from, save_to=args.output_dir)
        accelerator.end_training()
        return

    # ---- DPO-Iter (paper Sec. 4.3): sample -> label -> DPO, the trained policy becomes the next reference ----
    first, step, policy_path = 1, 0, args.model_name_or_path
    if args.resume_from_checkpoint is not None:
        done = [int(p.name.split("_")[1]) for p in Path(args.output_dir).glob("iter_*") if (p / "iteration.json").exists()]
        if done:
            first = max(done) + 1
            policy_path = str(Path(args.output_dir) / f"iter_{first - 1}")
            step = json.loads((Path(policy_path) / "iteration.json").read_text())["step"]
            accelerator.print(f"resumed after iteration {first - 1} (step {step}) from {policy_path}")
    policy = load_policy(policy_path, args).to(accelerator.device)
    # Iteration 1's reference is --ref_model_name_or_path or the initial policy; later ones, the last policy.
    ref_path = args.ref_model_name_or_path if first == 1 and args.ref_model_name_or_path else None
    reward_model = rm_tokenizer = None
    if args.reward_model_name_or_path:
        reward_model = freeze(AutoModelForSequenceClassification.from_pretrained(
            args.reward_model_name_or_path, trust_remote_code=args.trust_remote_code)).to(accelerator.device)
        rm_tokenizer = AutoTokenizer.from_pretrained(args.reward_model_name_or_path, trust_remote_code=args.trust_remote_code)
        if rm_tokenizer.pad_token_id is None:
            rm_tokenizer.pad_token = rm_tokenizer.eos_token
    scorer = make_scorer(accelerator, args, tokenizer, reward_fn, reward_model, rm_tokenizer)
    for iteration in range(first, args.iterations + 1):
        iter_dir = Path(args.output_dir) / f"iter_{iteration}"
        set_seed(args.seed + iteration, device_specific=True)  # each process samples differently
        train_pairs, stats = build_iteration_pairs(accelerator, policy, tokenizer, train, scorer, args,
                                                   f"iteration {iteration} train")
        eval_pairs = build_iteration_pairs(accelerator, policy, tokenizer, evals, scorer, args,
                                           f"iteration {iteration} eval")[0] if evals else []
        log.log({"iteration": iteration, "iteration/pairs": stats["pairs"],
                 "iteration/ties_skipped": stats["ties_skipped"], "objective/scores": stats["scores_mean"]}, step)
        set_seed(args.seed)
        if ref_path is not None:
            ref_model = load_reference(args, accelerator)
        else:  # the policy as it is now: the initial policy, or the one the last iteration trained
            ref_model = freeze(copy.deepcopy(policy)) if not args.precompute_ref_logps else policy
        ref_hash = weights_sha256(ref_model)
        if args.precompute_ref_logps:
            for pairs in (train_pairs, eval_pairs):
                compute_ref_logps(accelerator, ref_model, pairs, args.per_device_eval_batch_size, tokenizer.pad_token_id)
            ref_model = None
            gc.collect()
        ref_path = None
        policy, step = train_dpo(args, accelerator, log, tokenizer, policy, ref_model, train_pairs, eval_pairs, step,
                                 checkpoints=False, save_to=str(iter_dir))
        del ref_model
        accelerator.free_memory()  # drop this iteration's optimizer and wrappers before the next
        if accelerator.is_main_process:
            with open(iter_dir / "pairs.jsonl", "w") as f:
                f.writelines(json.dumps(pair["record"]) + "\n" for pair in train_pairs)
            (iter_dir / "iteration.json").write_text(json.dumps(
                {"iteration": iteration, "step": step, "reference_sha256": ref_hash, **stats}))
        accelerator.wait_for_everyone()
    save_model(accelerator, policy, tokenizer, args.output_dir)
    accelerator.end_training()


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except DataError as e:
        sys.exit(f"error: {e}")
