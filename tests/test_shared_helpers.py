"""The stage scripts repeat small helpers instead of importing a local module (docs/design.md section 2).
The copies must stay byte-identical, so a fix made in one file is carried to every file."""

import ast
import builtins
import dataclasses
import importlib
import re
from functools import cache
from itertools import combinations

import pytest
from conftest import REPO, tyro_help

SCRIPTS = ["sft.py", "reward_model.py", "dpo.py", "ppo.py"]
ALL_SCRIPTS = SCRIPTS + ["synthetic_toy.py"]
SHARED = [
    "DataError", "load_split", "check_text", "split_hh_transcript", "to_preference",
    "render_chat", "encode_prompt", "encode_completion", "truncate", "pad", "position_ids_from",
    "token_logprobs", "last_token_index", "score_tokens", "check_model_path", "load_pretrained",
    "load_tokenizer", "disable_dropout", "check_finite", "generation_config", "MetricsLog",
    "RESUME_MAY_CHANGE", "on_main", "prepare_output_dir", "save_model", "save_checkpoint", "find_checkpoint",
    "load_checkpoint", "prepare_frozen", "check_reward_model", "load_reward_fn", "call_reward_fn",
    "apply_missing_eos_penalty", "to_prompts", "tokenize_prompts", "decode_response", "tokenize_after",
    "describe_run", "lr_schedule", "keep_rows_up_to", "same_vocab", "load_reward_tokenizer",
    "labeller_texts", "reward_model_inputs", "RUN_LOCK", "lock_output_dir", "start_tracker",
    "StopSignal", "STOP", "write_error", "write_model_dir", "end_training", "adamw",
    "checkpoints_open_as_models", "prune_checkpoints", "check_common_args", "make_accelerator",
    "prepare_for_training", "optimizer_step", "checkpoint_or_stop", "zero3_gathered",
    "truncate_after_eos", "make_train_loader", "count_steps", "prepare_training", "training_steps",
    "window_metrics", "full_state_dict",
]  # fmt: skip


@cache  # ast.get_source_segment splits the whole file on every call: once per script
def definitions(script):
    """{name: source} of the module-level functions, classes and assignments of a script."""
    source = (REPO / script).read_text()
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = ast.get_source_segment(source, node)
        elif (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
        ):
            out[node.targets[0].id] = ast.get_source_segment(source, node)
    return out


@pytest.mark.parametrize("name", SHARED)
def test_shared_helper_copies_are_identical(name):
    copies = {s: d[name] for s in SCRIPTS if name in (d := definitions(s))}
    assert copies, f"{name} is defined in no script: drop it from the list"
    for (a, src_a), (b, src_b) in combinations(copies.items(), 2):
        assert src_a == src_b, f"{name} differs between {a} and {b}"


# Each stage's own entry points: the same name on purpose, a different job in every script.
STAGE_OWN = {"Args", "main", "check_args", "evaluate"}


def test_a_function_in_two_scripts_is_on_the_identity_list():
    """Two copies of one helper that are not on the list drift apart (one gets a fix, one keeps the bug)."""
    defined = {s: {n for n in definitions(s) if not n.startswith("_")} for s in SCRIPTS}
    for a, b in combinations(SCRIPTS, 2):
        both = defined[a] & defined[b] - set(SHARED) - STAGE_OWN
        assert not both, (
            f"{sorted(both)} are defined in both {a} and {b} but are not shared helpers"
        )


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_scripts_import_no_local_module(script):
    local = {s[:-3] for s in ALL_SCRIPTS} | {"utils", "common", "helpers"}
    for node in ast.walk(ast.parse((REPO / script).read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        assert not any(n.split(".")[0] in local for n in names), f"{script} imports {names}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_shared_helpers_only_use_names_the_script_defines(script):
    """A helper copied into a file without the import it needs fails only on its rare paths (e.g.
    save_checkpoint's cleanup of a stale .tmp directory), so check every global name it reads."""
    tree = ast.parse((REPO / script).read_text())
    module_names = set(dir(builtins))
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            module_names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            module_names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            module_names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in SHARED:
            local = {
                a.arg
                for n in ast.walk(node)
                if isinstance(n, ast.arguments)
                for a in n.args + n.kwonlyargs + [n.vararg, n.kwarg]
                if a is not None
            }
            local |= {
                n.id
                for n in ast.walk(node)
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
            }
            local |= {
                n.name
                for n in ast.walk(node)
                if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.ExceptHandler))
            }
            local |= {  # imported inside the helper (e.g. deepspeed, only importable under DeepSpeed)
                (a.asname or a.name).split(".")[0]
                for n in ast.walk(node)
                if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names
            }
            read = {
                n.id
                for n in ast.walk(node)
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
            }
            missing = read - local - module_names
            assert not missing, f"{script}:{node.name} reads undefined {missing}"


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_help_says_what_the_script_does_and_documents_every_argument(script, capsys):
    args_class = importlib.import_module(script[:-3]).Args
    flat = tyro_help(args_class, capsys)
    assert f"python {script}" in flat, "--help gives no example command"
    source = (REPO / script).read_text()
    for field in dataclasses.fields(args_class):
        assert f"--{field.name.replace('_', '-')}" in flat, field.name
        doc = re.search(rf"\n    {field.name}: [^\n]*\n    \"\"\"(.+?)\"\"\"", source, re.DOTALL)
        assert doc, f"{field.name} has no docstring"
        assert " ".join(doc.group(1).split()[:4]) in flat, field.name


FENCE = "# ---- shared helpers: identical in every script that has them (tests/test_shared_helpers.py) ----"


@pytest.mark.parametrize("script", SCRIPTS)
def test_shared_helpers_sit_in_the_fenced_block_after_main(script):
    """docs/design.md section 2: the algorithm first, main() next, the shared helpers only in the fenced block."""
    source = (REPO / script).read_text()
    fence = source.splitlines().index(FENCE) + 1
    above = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            above[node.name] = node.lineno
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            above[node.targets[0].id] = node.lineno
    above = {name: line for name, line in above.items() if line < fence}
    assert "main" in above
    shared_above = sorted(name for name in above if name in SHARED)
    assert not shared_above, f"{script}: shared helpers above the fence: {shared_above}"


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_attn_implementation_reaches_every_model(kernel, tiny_model, tmp_path):
    """--attn_implementation goes to every from_pretrained, trained and frozen: ppo.py's policy,
    reference, reward model and critic, dpo.py's policy and reference, and the other scripts' loads
    (all through the shared load_pretrained); an unknown kernel is one error line."""
    from test_ppo import save_reward_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import dpo
    import ppo
    import sft

    rm = save_reward_model(AutoTokenizer.from_pretrained(tiny_model), tmp_path / "rm")
    args = ppo.Args(model_name_or_path=tiny_model, reward_model_name_or_path=rm,
                    attn_implementation=kernel)  # fmt: skip
    models = ppo.load_models(args, AutoTokenizer.from_pretrained(tiny_model), None)
    dpo_args = dpo.Args(model_name_or_path=tiny_model, attn_implementation=kernel)
    models += (dpo.load_policy(dpo_args, tiny_model),)
    assert [m.config._attn_implementation for m in models] == [kernel] * 5
    with pytest.raises(sft.DataError, match="cannot load a model from"):
        bad = sft.Args(model_name_or_path=tiny_model, attn_implementation="no_such_kernel")
        sft.load_pretrained(AutoModelForCausalLM, tiny_model, sft.torch.float32, bad)
