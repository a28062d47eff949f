"""Each stage's training step run by its script and by a bare loop doing the same work, side by side.

For every stage (SFT, reward model, DPO with a live and a precomputed reference, PPO at two response
lengths) and every repeat, two processes are forked from this one (imports paid once; each run its
own peak memory): one runs the script's own `main(Args(...))`, the other a plain loop over the same
model, batch shapes and math (the scripts' pure functions: `sft_loss_sum`, `sequence_rewards` and
`reward_loss`, `pair_stats`, PPO's `compute_*`, `policy_loss`, `value_loss`), with torch's
per-parameter AdamW and, in PPO, a second policy forward for the rollout's log-probabilities. The two
alternate in order between repeats. Timing is CPU time (time.process_time) between two fixed steps,
read when the script logs them (its MetricsLog.log is wrapped in the child: no hook in the script), so
start-up, the warm-up steps and the final save are left out. Reported: the median over repeats of each
side's CPU-s per step (per iteration for PPO), the median of the per-repeat ratios script / bare loop,
each side's peak RSS, and the machine's load average over the run.

The model: a Llama built from config (4 layers, hidden 256, intermediate 1024, 4 heads; no hub), the
tests' BPE tokenizer (vocabulary 400), one thread (torch.set_num_threads(1)).

    python benchmarks/speed.py                     # ~4 minutes on 2 cores: the README's speed table
    python benchmarks/speed.py --repeats 5         # tighter medians on a noisy machine (~6 minutes)
    python benchmarks/speed.py --rev 2186397       # the scripts of another commit (git show)
    python benchmarks/speed.py --quick             # smoke test: a tiny model, 1 repeat, seconds

Run on a quiet machine if you can: another job on the other core moves single runs by +-5%, which is
why the per-run ratios are printed next to their median.
"""

import argparse
import importlib.util
import json
import os
import random
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import cycle
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"sft": "sft.py", "rm": "reward_model.py", "dpo": "dpo.py", "ppo": "ppo.py"}
os.environ.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
os.environ.update(HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
# pyarrow (imported by datasets) would start a jemalloc thread; a fork copies only the forking thread
os.environ.setdefault("JE_ARROW_MALLOC_CONF", "background_thread:false")
WORK = Path(tempfile.mkdtemp(prefix="speed-"))
os.environ.setdefault("HF_DATASETS_CACHE", str(WORK / "datasets_cache"))

import torch

torch.set_num_threads(1)
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
)

sys.path.insert(0, str(REPO / "tests"))
from conftest import _CORPUS, build_tokenizer  # the tests' tokenizer, built offline

CAUSAL_LM, SEQ_CLS, F32 = AutoModelForCausalLM, AutoModelForSequenceClassification, torch.float32


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- settings, model, data ----


def settings(quick: bool) -> dict:
    """Model size, batch shapes, warm-up and timed steps."""
    if quick:
        return {"model": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2},
                "warmup": 1, "timed": 2, "ppo_warmup": 1, "ppo_timed": 1, "batch": 4, "length": 24,
                "prompts": 4, "ppo_tokens": [4], "repeats": 1}  # fmt: skip
    return {"model": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4},
            "warmup": 2, "timed": 10, "ppo_warmup": 1, "ppo_timed": 3, "batch": 8, "length": 64,
            "prompts": 16, "ppo_tokens": [32, 64], "repeats": 3}  # fmt: skip


def build_fixtures(cfg: dict) -> dict:
    """A tokenizer, a causal LM and a reward model (PPO's critic starts from it) from one config, and
    the data: every prompt and every response the same number of tokens (words that are one token
    with or without a leading space), so every batch has the same shape whatever the data order."""
    tok = build_tokenizer(pad=True)
    config = LlamaConfig(**cfg["model"], num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    paths = {"policy": WORK / "policy", "rm": WORK / "reward_model"}
    CAUSAL_LM.from_config(config).save_pretrained(paths["policy"])
    config.num_labels = 1
    SEQ_CLS.from_config(config).save_pretrained(paths["rm"])
    for p in paths.values():
        tok.save_pretrained(p)
    words = sorted(set(" ".join(_CORPUS).split()))
    words = [w for w in words if len(tok(w).input_ids) == len(tok(" " + w).input_ids) == 1]
    rng = random.Random(0)
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))
    n_prompt = cfg["length"] // 4
    n_response = cfg["length"] - n_prompt - 1  # + EOS
    pref = [
        {"prompt": text(n_prompt), "chosen": " " + text(n_response), "rejected": " " + text(n_response)}
        for _ in range(8 * max(cfg["batch"], cfg["prompts"]))
    ]  # fmt: skip
    sft = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pref]
    for name, data in (("pref", pref), ("sft", sft)):
        paths[name] = WORK / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in data))
    return {**{k: str(v) for k, v in paths.items()}, "prompt_tokens": n_prompt,
            "response_tokens": n_response}  # fmt: skip


def plans(cfg: dict, paths: dict, stages: list) -> list:
    """One entry per table row: the script, its arguments (fields every version of the scripts has),
    the bare loop, the setting, and the two steps timed between."""
    out = []
    common = {"save_steps": 0, "seed": 1, "model_name_or_path": paths["policy"]}
    w, n = cfg["warmup"], cfg["warmup"] + cfg["timed"]
    steps = {"max_steps": n, "logging_steps": w, "per_device_train_batch_size": cfg["batch"],
             "max_length": 2 * cfg["length"]}  # fmt: skip
    shape = f"{paths['prompt_tokens']} prompt + {paths['response_tokens']} response tokens + EOS"
    b = cfg["batch"]
    if "sft" in stages:
        args = {**common, **steps, "dataset_name": paths["sft"]}
        out.append(("sft", args, bare_sft, f"batch {b} examples, {shape}", w, n))
    if "rm" in stages:
        args = {**common, **steps, "dataset_name": paths["pref"]}
        out.append(("rm", args, bare_rm, f"batch {b} pairs, {shape}", w, n))
    if "dpo" in stages:
        args = {**common, **steps, "dataset_name": paths["pref"], "eval_on_start": False}
        out.append(("dpo", args, bare_dpo, f"batch {b} pairs, {shape}, live reference", w, n))
        args = {**args, "precompute_ref_logps": True}
        out.append(("dpo", args, bare_dpo, "same, `--precompute_ref_logps`", w, n))
    if "ppo" in stages:
        w, n = cfg["ppo_warmup"], cfg["ppo_warmup"] + cfg["ppo_timed"]
        for tokens in cfg["ppo_tokens"]:
            args = {**common, "dataset_name": paths["pref"], "reward_model_name_or_path": paths["rm"],
                    "per_device_prompt_batch_size": cfg["prompts"], "num_minibatches": 4,
                    "local_rollout_forward_batch_size": cfg["prompts"],
                    "per_device_train_batch_size": max(1, cfg["prompts"] // 4),
                    "max_new_tokens": tokens, "num_iterations": n, "logging_steps": 1,
                    "max_prompt_length": cfg["length"]}  # fmt: skip
            setting = (f"{cfg['prompts']} prompts of {paths['prompt_tokens']} tokens x {tokens} new "
                       "tokens, reward model, 4 minibatches")  # fmt: skip
            out.append(("ppo", args, bare_ppo, setting, w, n))
    return out


# ---- the bare loops: the same work as each script's step, none of its plumbing ----


def plain_adamw(params, lr, weight_decay=0.0):
    """torch's per-parameter AdamW (its default on CPU)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)


def loader_of(items, batch_size, collate):
    generator = torch.Generator().manual_seed(1)
    return torch.utils.data.DataLoader(
        items, batch_size, shuffle=True, drop_last=True, collate_fn=collate, generator=generator
    )


def step_optimizer(params, opt):
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad()


def bare_sft(m, a, mark):
    tok = AutoTokenizer.from_pretrained(a["model_name_or_path"])
    ds = m.to_sft(m.load_split(a["dataset_name"], None, "train"))
    train = m.tokenize_sft(ds, tok, a["max_length"], None, "train")
    collate = lambda b: m.collate_sft(b, tok.pad_token_id)
    loader = loader_of(train, a["per_device_train_batch_size"], collate)
    model = CAUSAL_LM.from_pretrained(a["model_name_or_path"], dtype=F32).train()
    opt = plain_adamw(model.parameters(), 2e-5)
    for step, batch in zip(range(1, a["max_steps"] + 1), cycle(loader)):
        loss_sum, n = m.sft_loss_sum(model, batch)
        (loss_sum.sum() / n.sum()).backward()
        step_optimizer(model.parameters(), opt)
        mark(step)


def bare_rm(m, a, mark):
    tok = AutoTokenizer.from_pretrained(a["model_name_or_path"])
    ds = m.to_reward_pairs(m.load_split(a["dataset_name"], None, "train"))
    train = m.tokenize_pairs(ds, tok, a["max_length"], None, "train")
    collate = lambda b: m.collate_reward_pairs(b, tok.pad_token_id)
    loader = loader_of(train, a["per_device_train_batch_size"], collate)
    model = SEQ_CLS.from_pretrained(a["model_name_or_path"], dtype=F32, num_labels=1,
                                    pad_token_id=tok.pad_token_id).train()  # fmt: skip
    opt = plain_adamw(model.parameters(), 1e-5)
    for step, batch in zip(range(1, a["max_steps"] + 1), cycle(loader)):
        rewards = m.sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
        n = len(batch["margin"])
        m.reward_loss(rewards[:n], rewards[n:], batch["margin"]).mean().backward()
        step_optimizer(model.parameters(), opt)
        mark(step)


def bare_dpo(m, a, mark):
    """With precompute_ref_logps the reference's log-probs are computed once before step 1 (untimed)
    and the reference is dropped, as dpo.py does."""
    tok = AutoTokenizer.from_pretrained(a["model_name_or_path"])
    ds = m.to_preference(m.load_split(a["dataset_name"], None, "train"))
    train = m.tokenize_preference(ds, tok, a["max_length"], None, "train")
    ref = CAUSAL_LM.from_pretrained(a["model_name_or_path"], dtype=F32).eval().requires_grad_(False)
    if a.get("precompute_ref_logps"):
        with torch.no_grad():
            for pair in train:
                chosen, rejected = m.concatenated_forward(
                    ref, m.collate_pairs([pair], tok.pad_token_id)
                )
                pair["ref_chosen_logps"], pair["ref_rejected_logps"] = (
                    chosen.item(),
                    rejected.item(),
                )
        ref = None
    collate = lambda b: m.collate_pairs(b, tok.pad_token_id)
    loader = loader_of(train, a["per_device_train_batch_size"], collate)
    policy = CAUSAL_LM.from_pretrained(a["model_name_or_path"], dtype=F32).train()
    opt = plain_adamw(policy.parameters(), 1e-6)
    dpo_args = argparse.Namespace(beta=0.1, loss_type="sigmoid", label_smoothing=0.0)
    for step, batch in zip(range(1, a["max_steps"] + 1), cycle(loader)):
        losses, _ = m.pair_stats(policy, ref, batch, dpo_args)
        losses.mean().backward()
        step_optimizer(policy.parameters(), opt)
        mark(step)


def bare_ppo(m, a, mark):
    """One iteration: sample, a second policy forward for the log-probs, the reference, critic and
    reward forwards, GAE, num_minibatches optimizer steps over micro-batches, the reference EMA."""
    tok = AutoTokenizer.from_pretrained(a["model_name_or_path"])
    prompts = m.to_prompts(m.load_split(a["dataset_name"], None, "train"))
    max_length = a["max_prompt_length"] + a["max_new_tokens"]
    kept = m.tokenize_prompts(prompts, tok, max_length, a["max_prompt_length"], "train")
    B, pad_id = a["per_device_prompt_batch_size"], tok.pad_token_id
    loader = loader_of(kept, B, lambda b: m.collate_prompts(b, pad_id))
    policy = CAUSAL_LM.from_pretrained(a["model_name_or_path"], dtype=F32)
    ref = CAUSAL_LM.from_pretrained(a["model_name_or_path"], dtype=F32).eval().requires_grad_(False)
    rm_path = a["reward_model_name_or_path"]
    critic = SEQ_CLS.from_pretrained(rm_path, dtype=F32, num_labels=1)
    reward = SEQ_CLS.from_pretrained(rm_path, dtype=F32, num_labels=1).eval().requires_grad_(False)
    P = m.Args()  # the script's defaults: temperature, top_k, clip ranges, kl_coef, lr ...
    T = P.temperature
    config = m.generation_config(tok, a["max_new_tokens"], True, T, P.top_k, P.top_p)
    opt = plain_adamw([{"params": policy.parameters(), "lr": P.learning_rate},
                       {"params": critic.parameters(), "lr": P.critic_learning_rate}], P.learning_rate)  # fmt: skip
    stats, n_mb, n_micro = m.RunningMeanStd(), B // 4, a["per_device_train_batch_size"]
    torch.manual_seed(1)
    for step, batch in zip(range(1, a["num_iterations"] + 1), cycle(loader)):
        prompts, prompt_mask = batch["input_ids"], batch["attention_mask"]
        policy.eval(), critic.eval()
        with torch.no_grad():
            out = policy.generate(
                input_ids=prompts, attention_mask=prompt_mask, generation_config=config
            )
            responses = out[:, prompts.shape[1] :]
            responses, response_mask, _ = m.truncate_after_eos(responses, tok.eos_token_id, pad_id)
            ids, mask = (
                torch.cat([prompts, responses], 1),
                torch.cat([prompt_mask, response_mask], 1),
            )
            R = responses.shape[1]
            logp = m.response_logprobs(m.response_logits(policy, ids, mask, R), responses, T)
            ref_logp = m.response_logprobs(m.response_logits(ref, ids, mask, R), responses, T)
            values = m.score_tokens(critic, ids, mask)[:, -R - 1 : -1].float()
            scores = m.score_tokens(reward, ids, mask)[torch.arange(B), m.last_token_index(mask)]
        rewards, _, _ = m.compute_rewards(
            scores, logp, ref_logp, response_mask, P.kl_coef, P.reward_clip
        )
        fmask = response_mask.float()
        old_values = values * fmask
        values = (values * stats.std + stats.mean) * fmask
        adv, returns = m.compute_advantages(rewards, values, fmask, P.gamma, P.lam, True)
        stats.update(returns, fmask)
        target = (returns - stats.mean) / stats.std * fmask
        policy.train(), critic.train()
        order = torch.randperm(B)
        for start in range(0, B, n_mb):
            mb = order[start : start + n_mb]
            n_tokens = fmask[mb].sum().clamp(min=1)
            for m0 in range(0, n_mb, n_micro):
                i = mb[m0 : m0 + n_micro]
                logits = m.response_logits(policy, ids[i], mask[i], R)
                new_values = m.score_tokens(critic, ids[i], mask[i])[:, -R - 1 : -1].float()
                new_logp = m.response_logprobs(logits, responses[i], T)
                pg, _ = m.policy_loss(new_logp, logp[i], adv[i], fmask[i], P.clip_range, n_tokens)
                vf, _ = m.value_loss(new_values, old_values[i], target[i], fmask[i],
                                     P.clip_range_value, n_tokens)  # fmt: skip
                (pg + P.vf_coef * vf).backward()
            for part in (policy, critic):
                torch.nn.utils.clip_grad_norm_(part.parameters(), P.max_grad_norm)
            opt.step()
            opt.zero_grad()
        m.ema_update(ref, policy, P.ref_ema)
        mark(step)


# ---- one measured run, in a forked child ----


class Marks:
    """CPU and wall time at the end of the given steps."""

    def __init__(self, steps):
        self.steps, self.at = set(steps), {}

    def __call__(self, step: int):
        if step in self.steps and step not in self.at:
            self.at[step] = (time.process_time(), time.perf_counter())


def run_script(module, args: dict, mark, dynamo_backend: str = "no"):
    """The script's own main(); the clock is read when it logs the marked steps. dynamo_backend: what
    `accelerate launch --dynamo_backend` sets (torch.compile of the model in accelerator.prepare)."""
    os.environ["ACCELERATE_DYNAMO_BACKEND"] = dynamo_backend.upper()  # in the forked child only
    log = module.MetricsLog.log

    def timed_log(self, metrics, step):
        mark(step)
        return log(self, metrics, step)

    module.MetricsLog.log = timed_log
    module.main(module.Args(**args))


def measure(fn, first: int, last: int) -> dict:
    """fn(mark) in a forked child -> its CPU-s and wall-s per step between steps first and last, and
    its peak RSS."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run, report, exit without the parent's cleanup
        os.close(read)
        code = 0
        try:
            mark = Marks([first, last])
            devnull = os.open(os.devnull, os.O_WRONLY)  # the scripts' progress bars and counts
            os.dup2(devnull, 1), os.dup2(devnull, 2)
            fn(mark)
            (c0, w0), (c1, w1) = mark.at[first], mark.at[last]
            result = {"cpu": (c1 - c0) / (last - first), "wall": (w1 - w0) / (last - first)}
            result["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        except BaseException as e:  # reported to the parent
            result, code = {"error": f"{type(e).__name__}: {e}"}, 1
        os.write(write, json.dumps(result).encode())
        os._exit(code)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks) or b'{"error": "no result"}')
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


# ---- the table ----


def git_rev(path: Path) -> str:
    git = ["git", "-C", str(path)]
    try:
        rev = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()  # fmt: skip
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"
    dirty = subprocess.run([*git, "status", "--porcelain", "--", *SCRIPTS.values()],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return rev + (" + uncommitted changes" if dirty else "")


def scripts_from_rev(rev: str) -> Path:
    folder = WORK / f"scripts-{rev}"
    folder.mkdir()
    for name in SCRIPTS.values():
        src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{name}"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        (folder / name).write_text(src)
    return folder


def table(rows: list, header: dict) -> str:
    command = (f"`{header['command']}`: scripts at {header['scripts']}, torch {torch.__version__}, "
               f"{header['repeats']} repeat(s) in {header['elapsed']:.0f} s, load average (1 min) "
               f"{header['load_min']:.1f}-{header['load_max']:.1f} on {os.cpu_count()} cores")  # fmt: skip
    columns = ("| script | setting | script CPU-s/step | plain bare loop CPU-s/step | script / bare "
               "(median) | per run | peak RSS script / bare (MB) |")  # fmt: skip
    lines = [command, "", columns, "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratios = ", ".join(f"{x:.3f}" for x in r["ratios"])
        lines.append(f"| `{r['script']}` | {r['setting']} | {r['cpu_script']:.4f} | {r['cpu_bare']:.4f} "
                     f"| **{r['ratio']:.3f}** | {ratios} | {r['rss_script']:.0f} / {r['rss_bare']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model, 1 repeat")
    parser.add_argument("--repeats", type=int, default=None, help="runs per side (default 3)")
    parser.add_argument("--rev", default=None, help="measure the scripts of this git revision")
    parser.add_argument("--stages", default="sft,rm,dpo,ppo", help="a comma-separated subset")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument("--dynamo_backend", default="no",
                        help="the scripts' side as under `accelerate launch --dynamo_backend` (e.g. "
                        "inductor: torch.compile; compiling falls in the warm-up steps)")  # fmt: skip
    opts = parser.parse_args(argv)
    cfg = settings(opts.quick)
    repeats = opts.repeats or cfg["repeats"]
    scripts_dir = scripts_from_rev(opts.rev) if opts.rev else REPO
    under_test = {s: load_module(scripts_dir / f, f"under_test_{s}") for s, f in SCRIPTS.items()}
    # the bare loops use this checkout's pure functions, whichever scripts are measured
    math_of = {s: load_module(REPO / f, f"bare_{s}") for s, f in SCRIPTS.items()}
    paths = build_fixtures(cfg)
    rows_to_run = plans(cfg, paths, opts.stages.split(","))
    t_start, loads = time.time(), [os.getloadavg()[0]]
    runs = [{"script": [], "bare": []} for _ in rows_to_run]
    for r in range(repeats):
        for i, (s, args, bare, setting, first, last) in enumerate(rows_to_run):
            for side in ["script", "bare"] if r % 2 == 0 else ["bare", "script"]:
                args = {**args, "output_dir": str(WORK / f"run-{i}-{r}-{side}")}
                if side == "script":
                    fn = lambda mark, s=s, args=args: run_script(under_test[s], args, mark, opts.dynamo_backend)  # fmt: skip
                else:
                    fn = lambda mark, s=s, args=args, bare=bare: bare(math_of[s], args, mark)
                runs[i][side].append(measure(fn, first, last))
                loads.append(os.getloadavg()[0])
                print(f"{SCRIPTS[s]}, {setting}, repeat {r + 1}, {side}: {runs[i][side][-1]}",
                      file=sys.stderr)  # fmt: skip
    rows = []
    compiled = "" if opts.dynamo_backend == "no" else f"; script compiled ({opts.dynamo_backend})"
    for (s, _, _, setting, _, _), run in zip(rows_to_run, runs):
        setting += compiled
        ratios = [a["cpu"] / b["cpu"] for a, b in zip(run["script"], run["bare"])]
        rows.append({"script": SCRIPTS[s], "setting": setting, "ratio": statistics.median(ratios),
                     "ratios": ratios, **{f"cpu_{k}": statistics.median(x["cpu"] for x in v)
                                          for k, v in run.items()},
                     **{f"rss_{k}": max(x["rss_mb"] for x in v) for k, v in run.items()}})  # fmt: skip
    command = " ".join(["python benchmarks/speed.py", *map(shlex.quote, argv or sys.argv[1:])])
    header = {"command": command, "repeats": repeats, "elapsed": time.time() - t_start,
              "load_min": min(loads), "load_max": max(loads),
              "scripts": opts.rev or git_rev(scripts_dir)}  # fmt: skip
    text = table(rows, header)
    print(text)
    if opts.out:
        Path(opts.out).write_text(text)
    return rows


if __name__ == "__main__":
    main()
