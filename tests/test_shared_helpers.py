"""The stage scripts repeat small helpers instead of importing a local module (DESIGN section 2).
The copies must stay byte-identical, so a fix made in one file is carried to every file."""

import ast
import dataclasses
import importlib
import re
from itertools import combinations

import pytest
from conftest import REPO

SCRIPTS = ["sft.py", "reward_model.py", "dpo.py", "ppo.py"]
SHARED = ["DataError", "load_split", "split_hh_transcript", "to_preference", "render_chat", "encode_prompt",
          "encode_completion", "truncate", "pad", "position_ids_from", "token_logprobs", "load_tokenizer",
          "MetricsLog", "write_args", "save_model", "save_checkpoint", "find_checkpoint", "last_token_index",
          "score_tokens"]


def definitions(script):
    source = (REPO / script).read_text()
    tree = ast.parse(source)
    return {node.name: ast.get_source_segment(source, node) for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("name", SHARED)
def test_shared_helper_copies_are_identical(name):
    copies = {s: d[name] for s in SCRIPTS if name in (d := definitions(s))}
    assert copies, f"{name} is defined in no script"
    for (a, src_a), (b, src_b) in combinations(copies.items(), 2):
        assert src_a == src_b, f"{name} differs between {a} and {b}"


@pytest.mark.parametrize("script", SCRIPTS + ["synthetic_toy.py"])
def test_scripts_import_no_local_module(script):
    local = {s[:-3] for s in SCRIPTS + ["synthetic_toy.py"]} | {"utils", "common", "helpers"}
    for node in ast.walk(ast.parse((REPO / script).read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        assert not any(n.split(".")[0] in local for n in names), f"{script} imports {names}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_shared_helpers_only_use_names_the_script_defines(script):
    """A helper copied into a file without the import it needs fails only on its rare paths (e.g.
    save_checkpoint's cleanup of a stale .tmp directory), so check every global name it reads."""
    import builtins

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
            local = {a.arg for n in ast.walk(node) if isinstance(n, ast.arguments)
                     for a in n.args + n.kwonlyargs + [n.vararg, n.kwarg] if a is not None}
            local |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            local |= {n.name for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.ExceptHandler))}
            read = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
            assert not read - local - module_names, f"{script}:{node.name} reads undefined {read - local - module_names}"


@pytest.mark.parametrize("script", ["sft.py", "dpo.py"])
def test_help_documents_every_argument(script, run_script):
    help_text = run_script(script, "--help").stdout
    flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", help_text).split())
    source = (REPO / script).read_text()
    for field in dataclasses.fields(importlib.import_module(script[:-3]).Args):
        assert f"--{field.name.replace('_', '-')}" in flat, field.name
        doc = re.search(rf"\n    {field.name}: [^\n]*\n    \"\"\"(.+?)\"\"\"", source)
        assert doc, f"{field.name} has no docstring"
        assert " ".join(doc.group(1).split()[:4]) in flat, field.name
