"""Offline test harness (docs/design.md section 7).

Builds, once per test session and with no network:
- a tiny byte-level BPE tokenizer (trained in a fraction of a second) with a chat template, in two
  variants: one with a distinct pad token, one with no pad token at all;
- tiny models from config (2 layers, hidden 64) of four architectures: Llama, Qwen2, GPT-NeoX
  (Pythia) and GPT-2 (absolute positions), each saved with the tokenizer beside it so that the
  scripts load them through the real `from_pretrained` path;
- small JSONL data fixtures in every data shape of docs/design.md section 4.
"""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Tests run on 2 cores: oversubscribed torch threads are ~10x slower, and the hub is unreachable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests import the scripts' pure functions directly

ARCHS = ("llama", "qwen2", "gpt_neox", "gpt2")

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] -}}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- else -%}{{- '\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)

_CORPUS = [
    "Human: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "Human: Tell me a joke.\n\nAssistant: Why did the chicken cross the road? To get to the other side!",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - = ( ) [ ] { } , . ; : ! ?",
    "Question: sort the digits 3 1 2. Answer: 1 2 3. Reverse 1 2 3: 3 2 1.",
    "good great nice happy kind bad awful sad angry cruel helpful harmless safe unsafe",
    "<|user|>\nhello there<|assistant|>\nhi, how can I help you today?",
    "Once upon a time there was a small model that learned to follow instructions.",
]


def build_tokenizer(pad: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    kwargs = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}
    if pad:
        kwargs["pad_token"] = "<pad>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_sentencepiece_tokenizer(legacy: bool = False):
    """A SentencePiece-style word tokenizer (Metaspace: a word's leading space is part of its token,
    '▁Paris.'), as Llama's: decoded on its own, a response loses its leading space. legacy=True is
    built as a legacy Llama fast tokenizer is (normalizer: prepend '▁', spaces to '▁'): a text that
    starts with a space, tokenized alone, gets an extra '▁' token (' Paris.' -> '▁', '▁Paris.')."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "▁Capital", "▁of", "▁France?", "▁Paris.", "▁Rome.", "▁"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    if legacy:
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_config(arch: str, tokenizer):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    common = {
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch == "llama":
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
        )
    if arch == "qwen2":
        return Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
        )
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            rotary_pct=0.25,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            **common,
        )
    if arch == "gpt2":
        return GPT2Config(
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=256,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    raise ValueError(arch)


def save_tiny_model(arch: str, tokenizer, path: Path, seed: int = 0) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_config(arch, tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def reward_fn(tiny_dir):
    """A --reward_fn for tests that need any reward: the number of '!' in the response."""
    path = tiny_dir / "count_bang.py"
    path.write_text(
        "def count_bang(prompts, completions):\n    return [float(c.count('!')) for c in completions]\n"
    )
    return f"{path}:count_bang"


@pytest.fixture(scope="session")
def tokenizer_dir(tiny_dir):
    """A tokenizer with a distinct pad token and a chat template."""
    path = tiny_dir / "tokenizer"
    build_tokenizer(pad=True).save_pretrained(path)
    return str(path)


@pytest.fixture
def tok(tokenizer_dir):
    """The pad-token tokenizer, loaded fresh for each test (a test may change it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tokenizer_nopad_dir(tiny_dir):
    """The same tokenizer with no pad token (like Pythia's and Llama's)."""
    path = tiny_dir / "tokenizer_nopad"
    build_tokenizer(pad=False).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_models(tiny_dir):
    """{arch: path} of tiny causal LMs saved with the pad-token tokenizer; plus 'llama_nopad'."""
    paths = {}
    tok = build_tokenizer(pad=True)
    for arch in ARCHS:
        paths[arch] = save_tiny_model(arch, tok, tiny_dir / f"model_{arch}")
    paths["llama_nopad"] = save_tiny_model(
        "llama", build_tokenizer(pad=False), tiny_dir / "model_llama_nopad"
    )
    return paths


@pytest.fixture(scope="session")
def tiny_model(tiny_models):
    """The default tiny model (Llama) for tests that need just one."""
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def tiny_model_bf16(tiny_dir):
    """The tiny Llama saved in bfloat16, as most hub checkpoints are (transformers 5 keeps that dtype
    unless the script asks for another)."""
    from transformers import AutoModelForCausalLM

    path = save_tiny_model("llama", build_tokenizer(pad=True), tiny_dir / "model_llama_bf16_src")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    out = tiny_dir / "model_llama_bf16"
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer(pad=True).save_pretrained(out)
    return str(out)


CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


@pytest.fixture(scope="session")
def chatml_model(tiny_dir):
    """A tiny Llama whose tokenizer follows Qwen2.5-Instruct: ChatML template, EOS = '<|im_end|>', and
    each turn rendered as '...<|im_end|>\n' (the EOS is followed by a newline)."""
    tok = build_tokenizer(pad=True)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML_TEMPLATE
    return save_tiny_model("llama", tok, tiny_dir / "model_chatml")


@pytest.fixture(scope="session")
def dropout_model(tiny_dir):
    """A tiny Llama with attention_dropout=0.3, read as a float by the attention (no nn.Dropout module)."""
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer(pad=True)
    config = build_config("llama", tok)
    config.attention_dropout = 0.3
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    path = tiny_dir / "model_llama_dropout"
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


# ---- data fixtures, one JSONL file per shape of docs/design.md section 4 ----


def write_jsonl(path: Path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


_QA = [
    ("What is 2 + 2?", "It is 4."),
    ("Name a colour.", "Blue is a colour."),
    ("Say hello.", "Hello there!"),
    ("What is the capital of France?", "Paris."),
    ("Reverse 1 2 3.", "3 2 1."),
    ("Sort 3 1 2.", "1 2 3."),
    ("Is the sky blue?", "Yes, on a clear day."),
    ("Tell me a joke.", "Why did the chicken cross the road?"),
]


@pytest.fixture(scope="session")
def data_files(tiny_dir):
    """{shape: path} of small JSONL files in every data shape of docs/design.md section 4."""
    d = tiny_dir / "data"
    files = {}
    files["prompt_completion"] = write_jsonl(
        d / "prompt_completion.jsonl",
        [{"prompt": f"Q: {q}\nA:", "completion": f" {a}"} for q, a in _QA],
    )
    files["messages"] = write_jsonl(
        d / "messages.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": a},
                    {"role": "user", "content": "Thanks."},
                    {"role": "assistant", "content": "You are welcome."},
                ]
            }
            for q, a in _QA
        ],
    )
    files["preference"] = write_jsonl(
        d / "preference.jsonl",
        [
            {"prompt": f"Q: {q}\nA:", "chosen": f" {a}", "rejected": " I do not know."}
            for q, a in _QA
        ],
    )
    files["preference_messages"] = write_jsonl(
        d / "preference_messages.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": a}],
                "rejected": [{"role": "assistant", "content": "I do not know."}],
            }
            for q, a in _QA
        ],
    )
    files["hh"] = write_jsonl(
        d / "hh.jsonl",
        [
            {
                "chosen": f"\n\nHuman: hi\n\nAssistant: hello\n\nHuman: {q}\n\nAssistant: {a}",
                "rejected": f"\n\nHuman: hi\n\nAssistant: hello\n\nHuman: {q}\n\nAssistant: I do not know.",
            }
            for q, a in _QA
        ],
    )
    rows = []
    for i, (q, a) in enumerate(_QA):
        # cycle through: both safe, both unsafe, response_0 safer, response_1 safer
        safe0, safe1 = [(True, True), (False, False), (True, False), (False, True)][i % 4]
        rows.append(
            {
                "prompt": q,
                "response_0": a,
                "response_1": "I do not know.",
                "better_response_id": i % 2,
                "safer_response_id": 0
                if safe0 and not safe1
                else 1
                if safe1 and not safe0
                else i % 2,
                "is_response_0_safe": safe0,
                "is_response_1_safe": safe1,
            }
        )
    files["saferlhf"] = write_jsonl(d / "saferlhf.jsonl", rows)
    files["prompts"] = write_jsonl(d / "prompts.jsonl", [{"prompt": f"Q: {q}\nA:"} for q, _ in _QA])
    return files


# ---- running the scripts (CleanRL style): new processes, forked warm (tests/warm_launch.py) ----


def _env():
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        ACCELERATE_USE_CPU="1",
    )
    return env


def _free_port() -> int:
    with socket.socket() as s:  # a free port, so parallel test workers never share a rendezvous
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, env, timeout, check, warm=None):
    """subprocess.run(cmd), or the same command forked warm: warm=(script, args, launcher_args)."""
    if warm is None:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
    else:
        import warm_launch

        script, args, launcher, num_processes, port, shim = warm
        if launcher is not None:
            env = warm_launch.launch_env(launcher, script, env)
        # A warm launch that hangs (seen once in a fresh-clone CI run: a 2-process reward_model.py
        # run, before the forkserver was made single-threaded; not reproduced since) is stopped
        # after 300 s, reported with its output, and relaunched once on a new port; a second hang
        # fails the test.
        try:
            proc = warm_launch.run(
                script, args, env, REPO, num_processes, port, min(timeout, 300), shim
            )
        except subprocess.TimeoutExpired as hang:
            print(f"warm launch hung, relaunching once: {' '.join(map(str, cmd))}\n"
                  f"{hang.output}\n{hang.stderr}", file=sys.stderr)  # fmt: skip
            port = None if port is None else _free_port()
            # the hung launch may have written its run (args.json) before it hung
            again = [] if "--overwrite_output_dir" in args else ["--overwrite_output_dir"]
            proc = warm_launch.run(
                script, args + again, env, REPO, num_processes, port, timeout, shim
            )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state: a run of main() in this process (another precision, a tracker) needs it reset (and after)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def run_script():
    """run_script("sft.py", "--max_steps", "2", ..., check=True) -> CompletedProcess (stdout+stderr
    captured): `python sft.py ...` in a new process (forked warm; real_launcher=True: a subprocess)."""

    def run(script, *args, check=True, timeout=600, real_launcher=False):
        args = list(map(str, args))
        cmd = [sys.executable, str(REPO / script), *args]
        warm = None if real_launcher else (str(REPO / script), args, None, 1, None, None)
        return _run(cmd, _env(), timeout, check, warm)

    return run


@pytest.fixture(scope="session")
def run_accelerate():
    """Two processes over gloo on CPU (docs/design.md section 7): plain --cpu --num_processes 2 silently runs
    one. Forked warm with the environment `accelerate launch` prepares; real_launcher=True runs the
    `accelerate launch` command itself."""

    def run(script, *args, num_processes=2, check=True, timeout=600, real_launcher=False):
        port = _free_port()
        launcher = ["--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1"]
        launcher += ["--main_process_port", str(port), "--mixed_precision", "no"]
        launcher += ["--dynamo_backend", "no"]
        args = list(map(str, args))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, str(REPO / script)]
        cmd += args
        warm = (str(REPO / script), args, launcher, num_processes, port, None)
        return _run(cmd, _env(), timeout, check, None if real_launcher else warm)

    return run


@pytest.fixture(scope="session")
def run_killed():
    """run_killed("ppo.py", *args, when=lambda: ...) -> its stdout + stderr: `python ppo.py ...` forked
    warm, SIGKILLed the moment when() holds (polled every millisecond), as an out-of-memory kill or a
    lost node ends a run: no handler runs, files are left as they are. Fails if the run ends first."""

    def run(script, *args, when, timeout=300):
        import warm_launch

        with tempfile.TemporaryDirectory() as tmp:
            out, err = f"{tmp}/out", f"{tmp}/err"
            argv = list(map(str, args))
            p = warm_launch.start_one(str(REPO / script), argv, _env(), str(REPO), out, err)
            deadline = time.time() + timeout
            while p.is_alive() and not when() and time.time() < deadline:
                time.sleep(0.001)
            killed = p.is_alive() and when()
            p.kill()
            p.join()
            output = "".join(Path(f).read_text(errors="replace") for f in (out, err))
        assert killed, f"{script} ended (or timed out) before the moment to kill it:\n{output}"
        return output

    return run


TEARDOWN_ABORT = "terminate called without an active exception"
SHIM = REPO / "tests" / "deepspeed_shim" / "sitecustomize.py"


@pytest.fixture(scope="session")
def run_deepspeed():
    """DeepSpeed ZeRO-2/3 on 2 CPU processes (docs/design.md section 7) through the shipped config files:
    run_deepspeed("sft.py", *args, stage=3, bf16=False), or config_file=another YAML. DeepSpeed's CPU
    accelerator speaks gloo; the test-only sitecustomize in tests/deepspeed_shim makes accelerate
    accept that backend. Forked warm with the environment `accelerate launch --config_file ...`
    prepares; real_launcher=True runs the command itself."""

    def run(
        script,
        *args,
        stage=2,
        bf16=False,
        num_processes=2,
        check=True,
        timeout=600,
        config_file=None,
        real_launcher=False,
    ):
        env = _env()
        env.pop("ACCELERATE_USE_CPU")  # it would switch DeepSpeed off
        env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(SHIM.parent))
        args = list(map(str, args))
        for attempt in range(2):
            port = _free_port()
            config = config_file or REPO / "accelerate_configs" / f"deepspeed_zero{stage}.yaml"
            launcher = ["--config_file", str(config), "--num_processes", str(num_processes)]
            launcher += ["--main_process_port", str(port)]
            launcher += ["--mixed_precision", "bf16" if bf16 else "no"]
            again = ["--overwrite_output_dir"] if attempt else []  # the first try wrote its run
            cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher]
            cmd += [str(REPO / script), *args, *again]
            warm = (str(REPO / script), args + again, launcher, num_processes, port, str(SHIM))
            proc = _run(cmd, env, timeout, False, None if real_launcher else warm)
            # Known, not root-caused: now and then a DeepSpeed-on-CPU worker aborts while the
            # interpreter exits, after the script has finished (about 1 launch in 30 here; the review
            # saw it at f8cb464 too). Launch once more; a second abort fails the test.
            if proc.returncode == 0 or TEARDOWN_ABORT not in proc.stderr:
                break
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    return run


def assert_one_line_error(proc, *needles):
    """Bad input: non-zero exit, no traceback, exactly one 'error: ...' line containing every needle."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def tyro_help(args_class, capsys) -> str:
    """`--help` in-process (tyro prints it and exits 0; no ~4 s subprocess start), with the panels'
    box characters dropped and whitespace collapsed."""
    import tyro

    with pytest.raises(SystemExit) as exit_info:
        tyro.cli(args_class, args=["--help"])
    assert exit_info.value.code == 0
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", capsys.readouterr().out).split())


def main_error(script: str, **kwargs) -> str:
    """Run `script`'s main(Args(**kwargs)) in this process (no ~4 s subprocess start) and return the
    message of the DataError it must raise: the one `error:` line the command line prints."""
    import importlib

    module = importlib.import_module(script[:-3])
    with pytest.raises(module.DataError) as info:
        module.main(module.Args(**kwargs))
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


def read_metrics(output_dir) -> list:
    with open(Path(output_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def metrics():
    """metrics(output_dir) -> list of the dicts in output_dir/metrics.jsonl."""
    return read_metrics


def load_weights(path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="session")
def weights():
    """weights(model_dir) -> {name: tensor} from the saved safetensors files."""
    return load_weights


def pytest_sessionfinish(session):
    if "warm_launch" in sys.modules:
        sys.modules["warm_launch"].stop()
