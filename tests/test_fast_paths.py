"""The two paths that make a step cheaper than a plain loop (benchmarks/speed.py measures them): a fused
AdamW step, and the rollout's policy log-probabilities taken from the generation pass."""

import ast
import importlib
import json
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO

import ppo

SCRIPTS = ["sft.py", "reward_model.py", "dpo.py", "ppo.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_adamw_is_fused_on_cpu_and_torchs_default_under_deepspeed(script):
    module = importlib.import_module(script[:-3])
    params = [torch.nn.Parameter(torch.ones(3))]
    plain = SimpleNamespace(
        state=SimpleNamespace(deepspeed_plugin=None), device=torch.device("cpu")
    )
    optimizer = module.adamw(plain, params, lr=0.1, weight_decay=0.01)
    assert optimizer.defaults["fused"] is True and optimizer.defaults["weight_decay"] == 0.01
    under_deepspeed = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=object()),
                                      device=torch.device("cpu"))  # fmt: skip
    assert module.adamw(under_deepspeed, params, lr=0.1).defaults["fused"] is None
    # the same update as the per-parameter loop, up to float rounding
    grads = [torch.randn(3) for _ in range(3)]
    steps = []
    for fused in (True, None):
        p = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.01, fused=fused)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        steps.append(p.detach())
    assert torch.allclose(*steps, atol=1e-6)


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_builds_its_optimizer_with_the_shared_adamw(script):
    """main() / train_dpo() / the shared prepare_training() call adamw(accelerator, ...);
    torch.optim.AdamW appears only inside it."""
    tree = ast.parse((REPO / script).read_text())
    callers = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for call in ast.walk(node):
            if isinstance(call, ast.Call):
                name = ast.unparse(call.func)
                if name == "torch.optim.AdamW":
                    assert node.name == "adamw", f"{script}:{node.name} builds a torch AdamW itself"
                if name == "adamw":
                    callers.append(node.name)
    assert callers in (["main"], ["train_dpo"], ["prepare_training"]), callers


def test_a_run_steps_a_fused_adamw(run_script, tiny_model, data_files, tmp_path):
    """End to end: the optimizer state accelerate checkpoints says fused (torch's default was None)."""
    out = tmp_path / "sft"
    run_script("sft.py", "--model_name_or_path", tiny_model, "--dataset_name", data_files["prompt_completion"],
               "--output_dir", out, "--max_steps", 2, "--save_steps", 1, "--logging_steps", 1,
               "--per_device_train_batch_size", 2)  # fmt: skip
    state = torch.load(out / "checkpoints" / "step_1" / "optimizer.bin", weights_only=True)
    assert [g["fused"] for g in state["param_groups"]] == [True]


@pytest.fixture
def policy_and_critic(tiny_model):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    critic = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, dtype=torch.float32, num_labels=1, pad_token_id=tok.pad_token_id
    ).eval()
    return tok, policy, critic


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 50, 0.9)])
def test_generation_logprobs_equal_a_second_forward(
    policy_and_critic, fresh_accelerator_state, temperature, top_k, top_p
):
    """Within 1e-5 of the recompute, temperature applied, top-k/top-p kept out (on this flat tiny model
    the top-50 of 400 tokens hold a small part of the mass: renormalized log-probs would be off by
    more than a nat), left-padded prompts in chunks of different response widths, and the sampling
    itself unchanged. With them, the critic's values are those of the full rollout forward."""
    from accelerate import Accelerator

    tok, policy, critic = policy_and_critic
    accelerator = Accelerator(cpu=True)
    texts = [
        "Q: Say hello.\nA:",
        "Q: hi\nA:",
        "Human: Tell me a joke.",
        "The quick brown fox",
        "hi",
    ]
    batch = ppo.collate_prompts(
        [{"prompt": t, "prompt_ids": tok(t).input_ids} for t in texts], tok.pad_token_id
    )
    prompts, prompt_mask, pad_id = batch["input_ids"], batch["attention_mask"], tok.pad_token_id
    config = ppo.generation_config(tok, 12, True, temperature, top_k, top_p)
    torch.manual_seed(0)
    sampled = ppo.generate(accelerator, policy, prompts, prompt_mask, config, 2, pad_id)
    torch.manual_seed(0)
    responses, logps = ppo.generate(
        accelerator, policy, prompts, prompt_mask, config, 2, pad_id, with_logps=True
    )
    assert torch.equal(responses, sampled) and logps.shape == responses.shape
    responses, mask, _ = ppo.truncate_after_eos(responses, tok.eos_token_id, pad_id)
    seqs = (prompts, prompt_mask, responses, mask)
    model = ppo.PolicyAndValue(policy, critic)
    recomputed, ref, values = ppo.rollout_forward(accelerator, model, policy, *seqs, 2, temperature)
    kept, ref_kept, values_kept = ppo.rollout_forward(
        accelerator, model, policy, *seqs, 2, temperature, logps=logps
    )
    assert ((logps - recomputed).abs() * mask).max() < 1e-5
    assert kept is logps and torch.equal(ref_kept, ref) and torch.equal(values_kept, values)
    if top_k:  # the leak this rules out: log-probs of the top-k/top-p renormalized distribution
        full = torch.log_softmax(policy(prompts).logits[:, -1].float() / temperature, -1)
        assert full.topk(top_k).values.exp().sum(-1).max() < 0.5


# ---- compiled steps: accelerate's --dynamo_backend (torch.compile), no code in the scripts ----


def stage_args(script, tiny_model, data_files, reward_fn):
    """3 optimizer steps (PPO: iterations), a checkpoint at step 2."""
    common = ["--model_name_or_path", tiny_model, "--learning_rate", 1e-3, "--logging_steps", 1,
              "--save_steps", 2, "--seed", 5]  # fmt: skip
    if script == "ppo.py":
        return [*common, "--dataset_name", data_files["prompts"], "--reward_fn", reward_fn,
                "--per_device_prompt_batch_size", 2, "--samples_per_prompt", 2, "--num_minibatches", 1,
                "--per_device_train_batch_size", 4, "--max_new_tokens", 4, "--top_k", 0,
                "--num_iterations", 3]  # fmt: skip
    data = {"sft.py": "prompt_completion", "reward_model.py": "preference", "dpo.py": "preference"}
    return [*common, "--dataset_name", data_files[data[script]], "--max_steps", 3,
            "--per_device_train_batch_size", 4, "--lr_scheduler", "constant", "--warmup_ratio", 0.0]  # fmt: skip


@pytest.mark.parametrize("script", ["sft.py", "reward_model.py", "dpo.py", "ppo.py"])
def test_dynamo_backend_inductor_trains_as_eager_and_saves_plain_models(
    script, tiny_model, data_files, reward_fn, weights, tmp_path
):
    """`accelerate launch --dynamo_backend inductor script.py` (it sets ACCELERATE_DYNAMO_BACKEND):
    accelerate compiles the model in prepare(). The run trains as the eager run does, up to the
    compiled kernels' float rounding, and its final model and checkpoint keep their plain parameter
    names (no `_orig_mod.` prefix: before full_state_dict both were saved under it, and from_pretrained
    would have loaded neither)."""
    from conftest import _env, _run

    runs = {}
    for backend in ("no", "inductor"):
        out = tmp_path / backend
        args = [str(x) for x in [*stage_args(script, tiny_model, data_files, reward_fn), "--output_dir", out]]  # fmt: skip
        env = {**_env(), "ACCELERATE_DYNAMO_BACKEND": backend}
        cmd = [sys.executable, str(REPO / script), *args]
        _run(cmd, env, 600, True, (str(REPO / script), args, None, 1, None, None))
        rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
        losses = [r[k] for r in rows for k in ("train/loss", "loss/policy") if k in r]
        runs[backend] = weights(out), weights(out / "checkpoints" / "step_2"), losses
    (eager, eager_ckpt, eager_loss), (compiled, compiled_ckpt, compiled_loss) = runs.values()
    assert compiled.keys() == eager.keys() and compiled_ckpt.keys() == eager_ckpt.keys()
    assert len(compiled_loss) == 3 and compiled_loss == pytest.approx(
        eager_loss, rel=1e-3, abs=1e-6
    )
    # 3 Adam steps at lr 1e-3 move a weight by up to 3e-3; Adam's normalised step amplifies the
    # compiled kernels' rounding in near-zero gradients (seen: 2.4e-5), so 1e-4 is the bound
    for k in eager:
        assert torch.allclose(compiled[k], eager[k], atol=1e-4, rtol=1e-4), k
