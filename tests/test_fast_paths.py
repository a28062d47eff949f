"""The two paths that make a step cheaper than a plain loop (benchmarks/speed.py measures them): a fused
AdamW step, and the rollout's policy log-probabilities taken from the generation pass."""

import ast
import importlib
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO

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
    """main() / train_dpo() call adamw(accelerator, ...); torch.optim.AdamW appears only inside it."""
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
    assert callers in (["main"], ["train_dpo"]), callers


def test_a_run_steps_a_fused_adamw(run_script, tiny_model, data_files, tmp_path):
    """End to end: the optimizer state accelerate checkpoints says fused (torch's default was None)."""
    out = tmp_path / "sft"
    run_script("sft.py", "--model_name_or_path", tiny_model, "--dataset_name", data_files["prompt_completion"],
               "--output_dir", out, "--max_steps", 2, "--save_steps", 1, "--logging_steps", 1,
               "--per_device_train_batch_size", 2)  # fmt: skip
    state = torch.load(out / "checkpoints" / "step_1" / "optimizer.bin", weights_only=True)
    assert [g["fused"] for g in state["param_groups"]] == [True]
