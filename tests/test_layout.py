"""docs/design.md section 2: a script is a textbook (above the first fence) followed by an appendix
(this stage's plumbing, then the shared helpers). These tests keep the shape a reader relies on:
shallow functions, a short main(), the phases where a reader looks for them, no block copied between
scripts' textbooks, and the line counts."""

import ast
from itertools import combinations

import pytest
from conftest import REPO

SCRIPTS = ["sft.py", "reward_model.py", "dpo.py", "ppo.py"]
PLUMBING = "# ---- this stage's plumbing (not shared) ----"
SHARED = "# ---- shared helpers: identical in every script that has them (tests/test_shared_helpers.py) ----"
BLOCKS = (ast.For, ast.AsyncFor, ast.While, ast.If, ast.With, ast.AsyncWith, ast.Try, ast.Match)


def parse(script):
    source = (REPO / script).read_text()
    return source, source.splitlines(), ast.parse(source)


def first_fence(lines) -> int:
    """1-based line of the first fence (the appendix starts there)."""
    return next(i for i, line in enumerate(lines, 1) if line in (PLUMBING, SHARED))


def depth(node, level=0) -> int:
    """How many blocks (for, while, if, with, try, match) deep a function's body goes. An `elif` is
    the same level as its `if`; a nested function or class counts on its own."""
    deepest = level
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        is_elif = (
            isinstance(node, ast.If)
            and isinstance(child, ast.If)
            and child in node.orelse
            and child.col_offset == node.col_offset
        )
        deeper = isinstance(child, BLOCKS) and not is_elif
        deepest = max(deepest, depth(child, level + deeper))
    return deepest


def functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_depth_counts_blocks_not_elif():
    tree = ast.parse(
        "def f(x):\n    for a in x:\n        if a:\n            pass\n        elif a > 1:\n"
        "            with a:\n                pass\n        else:\n            if a:\n"
        "                while a:\n                    pass\n"
    )
    assert depth(tree.body[0]) == 4  # for > if/else > if > while


@pytest.mark.parametrize("script", SCRIPTS + ["synthetic_toy.py", "prepare_data.py"])
def test_no_function_nests_deeper_than_five_levels(script):
    _, _, tree = parse(script)
    deep = {f.name: depth(f) for f in functions(tree) if depth(f) > 5}
    assert not deep, f"{script}: nested deeper than 5 levels: {deep}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_main_is_at_most_130_lines(script):
    _, _, tree = parse(script)
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 130


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_appendix_is_plumbing_then_shared_helpers_after_main(script):
    _, lines, tree = parse(script)
    assert lines.count(SHARED) == 1 and lines.count(PLUMBING) <= 1
    fence = first_fence(lines)
    shared = lines.index(SHARED) + 1
    assert PLUMBING not in lines or lines.index(PLUMBING) + 1 < shared
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno < fence, "main() is part of the textbook"


def test_ppo_reads_as_three_named_phases_above_main():
    _, lines, tree = parse("ppo.py")
    defined = {n.name: n.lineno for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert defined["rollout"] < defined["ppo_update"] < defined["main"] < first_fence(lines)
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    called = {c.func.id for c in ast.walk(main) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}  # fmt: skip
    assert {"rollout", "ppo_update", "ema_update"} <= called


def textbook_code(script) -> list:
    """(line number, stripped line) of the code in the functions and classes above the first fence,
    comments and blank lines left out. Args is left out: its shared field names and docstrings are
    the house style (docs/design.md section 3)."""
    _, lines, tree = parse(script)
    fence = first_fence(lines)
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.lineno < fence:
            if node.name == "Args":
                continue
            for number in range(node.lineno, node.end_lineno + 1):
                text = lines[number - 1].strip()
                if text and not text.startswith("#"):
                    out.append((number, text))
    return out


def repeated_runs(a: list, b: list, min_lines: int = 6) -> list:
    """The maximal runs of >= min_lines consecutive identical lines in a and b: [(a_start, b_start, n)]."""
    where = {}
    for j, (_, text) in enumerate(b):
        where.setdefault(text, []).append(j)
    runs, covered = [], set()
    for i, (_, text) in enumerate(a):
        for j in where.get(text, []):
            if (i, j) in covered:
                continue
            n = 0
            while i + n < len(a) and j + n < len(b) and a[i + n][1] == b[j + n][1]:
                covered.add((i + n, j + n))
                n += 1
            if n >= min_lines:
                runs.append((a[i][0], b[j][0], n))
    return runs


def test_repeated_runs_finds_a_copied_block():
    block = [(i, f"x{i} = f({i})") for i in range(6)]
    a = [(100, "a = 1")] + [(101 + i, t) for i, t in block] + [(107, "return a")]
    b = [(200 + i, t) for i, t in block[:5]] + [(205, "y = 2")]
    assert repeated_runs(a, b) == [] and repeated_runs(a, b, 5) == [(101, 200, 5)]
    assert repeated_runs(a, [(300 + i, t) for i, t in block]) == [(101, 300, 6)]


@pytest.mark.parametrize("pair", list(combinations(SCRIPTS, 2)), ids="~".join)
def test_no_block_of_six_lines_is_copied_between_textbooks(pair):
    """A job done by two scripts is one shared, identity-tested helper; a block copied inline between
    them escapes the identity test and drifts (one copy gets a fix, the other keeps the bug)."""
    a, b = pair
    runs = repeated_runs(textbook_code(a), textbook_code(b))
    where = [f"{a}:{i} ~ {b}:{j} ({n} lines)" for i, j, n in runs]
    assert not where, "copied inline, make it a shared helper: " + "; ".join(where)


# Textbook budgets (docs/design.md section 2), after ruff format --line-length 100.
TEXTBOOK = {"sft.py": 460, "reward_model.py": 510, "dpo.py": 740, "ppo.py": 850}
# The appendix budgets of the design doc are 470 / 470 / 760 / 760. With every fault-tolerance and
# checkpoint feature in, no script meets them yet; these ceilings are today's counts, so the
# appendix can only shrink (lower a number when a change shrinks it). +8 each (ppo +7) on 2026-12-08:
# full_state_dict, so models saved under accelerate's --dynamo_backend keep their own names.
APPENDIX_CEILING = {"sft.py": 980, "reward_model.py": 992, "dpo.py": 1413, "ppo.py": 1413}


@pytest.mark.parametrize("script", SCRIPTS)
def test_line_budgets(script):
    _, lines, _ = parse(script)
    textbook, appendix = first_fence(lines) - 1, len(lines) - first_fence(lines) + 1
    assert textbook <= TEXTBOOK[script], f"{script}: textbook {textbook} > {TEXTBOOK[script]}"
    assert appendix <= APPENDIX_CEILING[script], f"{script}: appendix {appendix} lines"


def test_synthetic_toy_fits_its_budget():
    assert len((REPO / "synthetic_toy.py").read_text().splitlines()) <= 450


def reachable(defs: dict, roots: set, skip: frozenset = frozenset()) -> set:
    """The module-level functions and classes `roots` call, transitively (not through `skip`)."""
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name in skip or name not in defs:
            continue
        seen.add(name)
        todo += [n.id for n in ast.walk(defs[name]) if isinstance(n, ast.Name)]
    return seen


def test_dpo_reads_plain_dpo_before_dpo_iter():
    """The DPO loss, the pair data and the training loop come first; what only DPO-Iter uses (its
    rollout: sampling, labelling, pairing) sits in its own section after them."""
    _, lines, tree = parse("dpo.py")
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    section = next(i for i, line in enumerate(lines, 1) if line.startswith("# ---- DPO-Iter"))
    assert defs["dpo_loss"].lineno < defs["train_dpo"].lineno < defs["dpo_update"].lineno < section
    plain = reachable(defs, {"main"}, skip=frozenset({"rollout_pairs"}))
    only_iter = reachable(defs, {"rollout_pairs"}) - plain
    assert {"rollout_pairs", "sample_responses", "best_worst_pairs"} <= only_iter
    above = sorted(n for n in only_iter if defs[n].lineno < section)
    assert not above, f"DPO-Iter code above its section: {above}"
