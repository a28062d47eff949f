"""sft.py: unit tests of the data path and loss masking, end-to-end runs, learning, DDP, resume, errors."""

import json
import shutil

import pytest
import torch
from conftest import ARCHS, build_sentencepiece_tokenizer, main_error, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

import sft


def masked_text(tok, example):
    return tok.decode([t for t, m in zip(example["input_ids"], example["loss_mask"]) if m])


def unmasked_text(tok, example):
    return tok.decode([t for t, m in zip(example["input_ids"], example["loss_mask"]) if not m])


# ---- unit: which tokens carry loss, per data shape ----


def test_prompt_completion_loss_only_on_completion_and_eos(tok, data_files):
    ds = sft.to_sft(sft.load_split(data_files["prompt_completion"], None, "train"))
    ex = sft.tokenize_sft(ds, tok, 512, None, "t")
    assert masked_text(tok, ex[0]) == " It is 4.<|endoftext|>"
    assert unmasked_text(tok, ex[0]) == "Q: What is 2 + 2?\nA:"
    assert ex[0]["loss_mask"][-1] == 1 and ex[0]["input_ids"][-1] == tok.eos_token_id


def test_chat_template_loss_only_on_assistant_turns(tok, data_files):
    ds = sft.to_sft(sft.load_split(data_files["messages"], None, "train"))
    ex = sft.tokenize_sft(ds, tok, 512, None, "t")[0]
    # both assistant turns, each ending in EOS (the template's end of turn), and nothing else
    assert masked_text(tok, ex) == "It is 4.<|endoftext|>You are welcome.<|endoftext|>"
    assert (
        unmasked_text(tok, ex)
        == "<|system|>\nBe brief.\n<|user|>\nWhat is 2 + 2?\n<|assistant|>\n<|user|>\nThanks.\n<|assistant|>\n"
    )
    # the ids are exactly the tokenization of the rendered conversation pieces
    full = tok.apply_chat_template(ds[0]["messages"], tokenize=False)
    assert tok.decode(ex["input_ids"]) == full


def test_max_prompt_length_cuts_a_conversations_context_from_its_start(tok, data_files):
    """--max_prompt_length applies to messages data too: the context before the first assistant
    target keeps its last max_prompt_length tokens, and every target token is kept."""
    ds = sft.to_sft(sft.load_split(data_files["messages"], None, "train"))
    full = sft.tokenize_sft(ds, tok, 512, None, "t")[0]
    (cut,) = sft.tokenize_sft(ds.select([0]), tok, 512, 4, "t")
    assert cut["loss_mask"].index(1) == 4 < full["loss_mask"].index(1)
    n = full["loss_mask"].index(1) - 4
    assert cut["input_ids"] == full["input_ids"][n:] and cut["loss_mask"] == full["loss_mask"][n:]
    assert masked_text(tok, cut) == masked_text(tok, full)


def test_plain_text_trains_on_every_token_after_the_first(
    tok, tiny_model, run_script, weights, tmp_path
):
    """A `text` column (the commonest SFT shape): language modelling on the whole text, EOS appended,
    long texts keep their start; an empty text is dropped with a count; and a run on it trains."""
    rows = [{"text": "Once upon a time there was a model."}, {"text": ""}, {"text": "good " * 40}]
    ds = sft.to_sft(sft.Dataset.from_list(rows))
    first, long = sft.tokenize_sft(ds, tok, 16, None, "t")
    ids = tok(rows[0]["text"]).input_ids + [tok.eos_token_id]
    assert first["input_ids"] == ids and first["loss_mask"] == [0] + [1] * (len(ids) - 1)
    assert long["input_ids"] == tok(rows[2]["text"]).input_ids[:16] and sum(long["loss_mask"]) == 15
    path = write_jsonl(
        tmp_path / "text.jsonl", [{"text": t} for t in (rows[0]["text"], "good day") * 4]
    )
    out = tmp_path / "out"
    run_script("sft.py", "--model_name_or_path", tiny_model, "--dataset_name", path,
               "--max_steps", 2, "--learning_rate", 1e-3, "--output_dir", out)  # fmt: skip
    w, w0 = weights(out), weights(tiny_model)
    assert any(not torch.equal(w[k], w0[k]) for k in w)


def test_chat_template_path_gives_a_tokenizer_its_template(tiny_models, tmp_path):
    """--chat_template_path: a Jinja file becomes the tokenizer's chat template (saved with it); a
    missing file is one error line."""
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    args = sft.Args(model_name_or_path=tiny_models["llama_nopad"], chat_template_path=str(template))
    tokenizer = sft.load_tokenizer(args)
    assert tokenizer.chat_template == template.read_text()
    assert sft.render_chat(tokenizer, [{"role": "user", "content": "hi"}]) == "[user] hi\n"
    tokenizer.save_pretrained(tmp_path / "saved")
    assert AutoTokenizer.from_pretrained(tmp_path / "saved").chat_template == template.read_text()
    with pytest.raises(sft.DataError, match="no such file"):
        sft.load_tokenizer(
            sft.Args(model_name_or_path=args.model_name_or_path, chat_template_path="x.j2")
        )


def test_a_tokenizer_that_appends_eos_to_every_text_does_not_end_prompts_with_it():
    """add_eos_token=True (a Llama tokenizer option) appends EOS to every text: a prompt ending in EOS
    would teach the model to read a stop token before every answer."""
    from tokenizers import processors

    sp = build_sentencepiece_tokenizer()
    sp.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", sp.eos_token_id)]
    )
    assert sp("Capital of France?").input_ids[-1] == sp.eos_token_id  # what the option does
    prompt = sft.encode_prompt(sp, "Capital of France?")
    assert sp.convert_ids_to_tokens(prompt) == ["▁Capital", "▁of", "▁France?"]
    rows = [{"prompt": "Capital of France?", "completion": " Paris."}]
    (ex,) = sft.tokenize_sft(sft.Dataset.from_list(rows), sp, 512, None, "t")
    assert ex["input_ids"] == prompt + [sp.convert_tokens_to_ids("▁Paris."), sp.eos_token_id]


def test_a_completion_is_tokenized_as_it_reads_after_its_prompt():
    """A legacy Llama tokenizer gives ' Paris.' alone an extra '▁' token that it never produces after
    the prompt ('Capital of France? Paris.' ends in '▁Paris.'): the model would be trained to write a
    token it does not read. Completions are tokenized together with their prompt, then cut."""
    sp = build_sentencepiece_tokenizer(legacy=True)
    assert sp.convert_ids_to_tokens(sp(" Paris.", add_special_tokens=False).input_ids) == [
        "▁",
        "▁Paris.",
    ]  # the pitfall
    rows = [{"prompt": "Capital of France?", "completion": " Paris."}]
    (ex,) = sft.tokenize_sft(sft.Dataset.from_list(rows), sp, 512, None, "t")
    assert sp.convert_ids_to_tokens(ex["input_ids"]) == [
        "▁Capital", "▁of", "▁France?", "▁Paris.", "</s>"
    ]  # fmt: skip
    assert ex["input_ids"][:-1] == sp("Capital of France? Paris.").input_ids
    # the same rule in every script that encodes completions (a shared helper)
    assert sft.encode_completion(sp, "Capital of France?", " Paris.") == ex["input_ids"][3:]


def test_an_empty_assistant_turn_is_context_not_a_stop_target(tok, capsys):
    """An empty reply would train EOS right after '<|assistant|>': the model would learn to answer
    nothing. It stays as context for later turns; a conversation with only empty replies is dropped."""
    hi, bye = {"role": "user", "content": "Hi."}, {"role": "user", "content": "Bye."}
    rows = [
        {"messages": [hi, {"role": "assistant", "content": ""}]},
        {"messages": [hi, {"role": "assistant", "content": "Hello."}, bye, {"role": "assistant", "content": ""}]},
        {"messages": [hi, {"role": "assistant", "content": ""}, bye, {"role": "assistant", "content": "Ok."}]},
    ]  # fmt: skip
    first, second = sft.tokenize_sft(sft.Dataset.from_list(rows), tok, 512, None, "t")
    assert "1 dropped (1 empty completion)" in capsys.readouterr().out
    assert masked_text(tok, first) == "Hello.<|endoftext|>"
    assert tok.decode(first["input_ids"]).endswith("Hello.<|endoftext|>")  # the empty turn is cut
    assert masked_text(tok, second) == "Ok.<|endoftext|>"
    # the empty turn, EOS included, is context only
    assert unmasked_text(tok, second) == (
        "<|user|>\nHi.\n<|assistant|>\n<|endoftext|><|user|>\nBye.\n<|assistant|>\n"
    )


@pytest.fixture(scope="module")
def chatml_tok(chatml_model):
    return AutoTokenizer.from_pretrained(chatml_model)


def test_chatml_messages_end_each_turn_in_one_eos(chatml_tok):
    """ChatML renders '<|im_end|>\n' after each turn and its EOS is '<|im_end|>': each assistant turn is
    trained up to its one '<|im_end|>', where generation stops, and the sequence ends there."""
    messages = [
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "I am fine."},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "You are welcome."},
    ]
    ds = sft.Dataset.from_list([{"messages": messages}])
    (ex,) = sft.tokenize_sft(ds, chatml_tok, 512, None, "t")
    eos = chatml_tok.eos_token_id
    assert chatml_tok.convert_ids_to_tokens(eos) == "<|im_end|>"
    assert ex["input_ids"][-1] == eos and ex["input_ids"][-2] != eos
    assert masked_text(chatml_tok, ex) == "I am fine.<|im_end|>You are welcome.<|im_end|>"
    # the ids are the rendered conversation, less the trailing newline after the last turn
    assert chatml_tok.decode(ex["input_ids"]) + "\n" == chatml_tok.apply_chat_template(
        messages, tokenize=False
    )


def test_chatml_prompt_completion_end_in_one_eos(chatml_tok):
    rows = [
        {
            "prompt": [{"role": "user", "content": "How are you?"}],
            "completion": [{"role": "assistant", "content": "I am fine."}],
        },
        {"prompt": "How are you?", "completion": " I am fine."},
    ]
    for row, completion in zip(rows, ["I am fine.<|im_end|>", " I am fine.<|im_end|>"]):
        (ex,) = sft.tokenize_sft(sft.Dataset.from_list([row]), chatml_tok, 512, None, "t")
        assert ex["input_ids"][-1] == chatml_tok.eos_token_id != ex["input_ids"][-2]
        assert masked_text(chatml_tok, ex) == completion


def test_preference_data_trains_on_chosen(tok, data_files):
    for shape, prompt in [
        ("preference", "Q: What is 2 + 2?\nA:"),
        ("hh", "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: What is 2 + 2?\n\nAssistant:"),
    ]:
        ex = sft.tokenize_sft(
            sft.to_sft(sft.load_split(data_files[shape], None, "train")), tok, 512, None, "t"
        )[0]
        assert masked_text(tok, ex) == " It is 4.<|endoftext|>", shape
        assert unmasked_text(tok, ex) == prompt, shape
    ex = sft.tokenize_sft(
        sft.to_sft(sft.load_split(data_files["preference_messages"], None, "train")),
        tok,
        512,
        None,
        "t",
    )[0]
    assert masked_text(tok, ex) == "It is 4.<|endoftext|>"
    assert unmasked_text(tok, ex) == "<|user|>\nWhat is 2 + 2?\n<|assistant|>\n"


def test_hh_split_at_last_assistant_turn():
    chosen = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: good answer"
    rejected = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: bad"
    prompt, c, r = sft.split_hh_transcript(chosen, rejected)
    assert prompt == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    assert (c, r) == (" good answer", " bad")
    with pytest.raises(sft.DataError):
        sft.split_hh_transcript("no assistant turn", "no assistant turn")


def test_padding_carries_no_loss_and_loss_is_completion_nll(tok, tiny_model):
    examples = [
        {"input_ids": [5, 6, 7, 8, 9], "loss_mask": [0, 0, 1, 1, 1]},
        {"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]},
    ]
    batch = sft.collate_sft(examples, tok.pad_token_id)
    assert batch["input_ids"][1].tolist() == [5, 6, 7, tok.pad_token_id, tok.pad_token_id]
    assert batch["loss_mask"][1].tolist() == [0, 1, 1, 0, 0]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    loss_sum, n = sft.sft_loss_sum(model, batch)
    # independent reference: each sequence alone, unpadded, NLL of its completion tokens
    for i, e in enumerate(examples):
        ids = torch.tensor([e["input_ids"]])
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        ref = -sum(
            logp[t - 1, e["input_ids"][t]] for t in range(1, len(ids[0])) if e["loss_mask"][t]
        )
        assert loss_sum[i].item() == pytest.approx(ref.item(), abs=1e-4)
    assert n.tolist() == [3, 2]


def test_truncation_rules():
    # prompts keep their end, completions their start; no room -> None
    assert sft.truncate([1, 2, 3, 4], [5, 6, 7], 6, 2) == ([3, 4], [5, 6, 7], True)
    assert sft.truncate([1, 2], [5, 6, 7], 4, None) == ([1, 2], [5, 6], True)
    assert sft.truncate([1, 2], [5], 4, None) == ([1, 2], [5], False)
    assert sft.truncate([1, 2, 3, 4], [5], 4, None) is None


def test_token_logprobs_matches_log_softmax():
    logits = torch.randn(2, 3, 11)
    tokens = torch.randint(0, 11, (2, 3))
    ref = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(sft.token_logprobs(logits, tokens), ref, atol=1e-6)


# ---- end to end, every architecture ----


@pytest.mark.parametrize("arch", ARCHS)
def test_end_to_end_each_architecture(arch, tiny_models, data_files, run_script, metrics, tmp_path):
    out = tmp_path / arch
    run_script(
        "sft.py",
        "--model_name_or_path",
        tiny_models[arch],
        "--dataset_name",
        data_files["messages"],
        "--eval_split",
        "train[:4]",
        "--max_steps",
        4,
        "--per_device_train_batch_size",
        2,
        "--logging_steps",
        2,
        "--eval_steps",
        2,
        "--save_steps",
        2,
        "--max_new_tokens",
        4,
        "--output_dir",
        out,
    )
    for name in [
        "args.json",
        "metrics.jsonl",
        "samples.jsonl",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "checkpoints/step_2/step.json",
    ]:
        assert (out / name).exists(), name
    assert json.loads((out / "args.json").read_text())["max_steps"] == 4
    rows = metrics(out)
    train = [r for r in rows if "train/loss" in r]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in train] == [2, 4] and [r["step"] for r in evals] == [2, 4]
    for r in rows:
        assert all(torch.isfinite(torch.tensor(float(v))) for v in r.values())
    assert {"train/lr", "train/tokens_per_second"} <= set(train[0]) and "eval/perplexity" in evals[
        0
    ]
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Q: hi", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == len(tokenizer)


# ---- learning ----


def test_learns_to_reproduce_completions(tiny_model, run_script, tmp_path):
    pairs = [
        (f"Q{i}: {w}?\nA:", f" {a}")
        for i, (w, a) in enumerate(
            [
                ("red", "apple"),
                ("blue", "sky"),
                ("green", "grass"),
                ("black", "night"),
                ("white", "snow"),
                ("gold", "sun"),
                ("grey", "stone"),
                ("pink", "rose"),
            ]
        )
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "completion": c} for p, c in pairs])
    out = tmp_path / "out"
    run_script(
        "sft.py",
        "--model_name_or_path",
        tiny_model,
        "--init_from_scratch",
        "--dataset_name",
        data,
        "--max_steps",
        300,
        "--per_device_train_batch_size",
        8,
        "--learning_rate",
        3e-3,
        "--lr_scheduler",
        "constant",
        "--warmup_ratio",
        0,
        "--logging_steps",
        50,
        "--save_steps",
        0,
        "--output_dir",
        out,
    )
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    hits = 0
    for p, c in pairs:
        ids = tok(p, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        hits += tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True) == c
    assert hits >= 7, f"only {hits}/8 completions reproduced"


# ---- multi-process, DeepSpeed ZeRO-2/3, resume ----


def common_args(tiny_model, data_files):
    """2 steps on 8 examples at a global batch of 4, with an eval set of 3 (not a multiple of the
    2-process eval batch: even_batches pads it with a duplicate)."""
    return [
        "--model_name_or_path",
        tiny_model,
        "--dataset_name",
        data_files["prompt_completion"],
        "--max_steps",
        2,
        "--learning_rate",
        1e-3,
        "--logging_steps",
        1,
        "--seed",
        3,
        "--eval_split",
        "train[:3]",
        "--per_device_eval_batch_size",
        2,
        "--eval_steps",
        2,
        "--num_samples",
        2,
        "--max_new_tokens",
        4,
    ]


@pytest.fixture(scope="module")
def ddp_run(tiny_model, data_files, run_accelerate, tmp_path_factory):
    """One 2-process DDP run (2 x 2 sequences per step), shared by the 1-process and ZeRO comparisons."""
    out = tmp_path_factory.mktemp("sft_ddp") / "out"
    run_accelerate(
        "sft.py",
        *common_args(tiny_model, data_files),
        "--per_device_train_batch_size",
        2,
        "--save_steps",
        0,
        "--output_dir",
        out,
    )
    return out


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_two_processes_match_one_process(
    tiny_model, data_files, ddp_run, run_script, weights, metrics, tmp_path
):
    run_script(
        "sft.py",
        *common_args(tiny_model, data_files),
        "--per_device_train_batch_size",
        4,
        "--save_steps",
        0,
        "--output_dir",
        tmp_path / "one",
    )
    w1, w2, w0 = weights(tmp_path / "one"), weights(ddp_run), weights(tiny_model)
    assert max_diff(w1, w0) > 1e-3  # the runs trained
    assert max_diff(w1, w2) <= 1e-4
    # each eval example counted once: 3 examples over 2 processes x 2 (one padded duplicate)
    eval_one, eval_two = (
        [r["eval/loss"] for r in metrics(d) if "eval/loss" in r]
        for d in (tmp_path / "one", ddp_run)
    )
    assert eval_two == pytest.approx(eval_one, abs=1e-4)


# Every ZeRO stage x precision (each launch ~5 CPU-seconds from the warm interpreter).
@pytest.mark.parametrize("stage,bf16", [(2, False), (2, True), (3, False), (3, True)])
def test_deepspeed_zero(
    stage, bf16, tiny_model, data_files, ddp_run, run_deepspeed, weights, tmp_path
):
    """Every ZeRO stage and precision runs, checkpoints, evaluates, samples and saves a model that plain
    from_pretrained loads; ZeRO-3 in fp32 ends where the DDP run with the same global batch does."""
    out = tmp_path / "out"
    # ZeRO-2 fp32 also checks that DeepSpeed clips at --max_grad_norm (it clips inside its own step):
    # at 1e-7 most gradient elements are far below AdamW's eps, so the weights barely move.
    clip = ["--max_grad_norm", 1e-7] if (stage, bf16) == (2, False) else []
    run_deepspeed(
        "sft.py",
        *common_args(tiny_model, data_files),
        "--per_device_train_batch_size",
        2,
        "--save_steps",
        1,
        "--output_dir",
        out,
        *clip,
        *(["--bf16"] if bf16 else []),
        stage=stage,
        bf16=bf16,
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (out / "checkpoints" / "step_1" / "step.json").exists()
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2
    w, w0 = weights(out), weights(tiny_model)
    moved = torch.cat([(w[k].float() - w0[k]).abs().flatten() for k in w]).mean().item()
    assert moved < 5e-5 if clip else moved > 3e-4, moved  # measured: 7.6e-6 clipped, 6.0e-4 not
    if stage == 3 and not bf16:
        assert max_diff(weights(out), weights(ddp_run)) <= 1e-4


def test_deepspeed_config_with_other_accumulation_is_refused(
    tiny_model, data_files, run_deepspeed, monkeypatch, tmp_path
):
    monkeypatch.setenv(
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2"
    )  # what a DeepSpeed config sets
    proc = run_deepspeed(
        "sft.py",
        *common_args(tiny_model, data_files),
        "--per_device_train_batch_size",
        1,
        "--output_dir",
        tmp_path / "out",
        stage=2,
        num_processes=1,  # the refusal comes before any sharding: one process is enough
        check=False,
    )
    assert proc.returncode != 0
    errors = {line for line in proc.stderr.splitlines() if line.startswith("error:")}
    assert len(errors) == 1 and "gradient_accumulation_steps=2" in errors.pop(), proc.stderr[-2000:]


@pytest.mark.parametrize("name", ["linear", "cosine", "constant"])
def test_no_step_of_the_schedule_runs_at_lr_0(name):
    """transformers' get_scheduler starts its warm-up at lr 0, so a warm-up that rounds up to one step
    (3% of a 1-step run) made the whole run a no-op. Ours starts at 1 / (warmup + 1); without warm-up
    linear and cosine are get_scheduler's."""
    from transformers import get_scheduler

    def lrs(scheduler, n):
        out = []
        for _ in range(n):
            out.append(scheduler.get_last_lr()[0])
            scheduler.optimizer.step()
            scheduler.step()
        return out

    opt = lambda: torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert lrs(sft.lr_schedule(opt(), name, 0.03, 1), 1) == [0.5]
    assert lrs(sft.lr_schedule(opt(), name, 0.3, 10), 3) == [0.25, 0.5, 0.75]
    assert all(lr > 0 for lr in lrs(sft.lr_schedule(opt(), name, 0.1, 20), 20))
    if name != "constant":
        ours, theirs = (
            lrs(sft.lr_schedule(opt(), name, 0.0, 7), 7),
            lrs(get_scheduler(name, opt(), 0, 7), 7),
        )
        assert ours == pytest.approx(theirs)


def test_a_one_step_run_with_the_default_warmup_learns(
    tiny_model, data_files, run_script, weights, tmp_path
):
    out = tmp_path / "out"
    run_script("sft.py", "--model_name_or_path", tiny_model, "--dataset_name",
               data_files["prompt_completion"], "--max_steps", 1, "--output_dir", out)  # fmt: skip
    assert json.loads((out / "args.json").read_text())["warmup_ratio"] > 0  # the default
    w, w0 = weights(out), weights(tiny_model)
    assert any(not torch.equal(w[k], w0[k]) for k in w), "the only step ran at lr 0"


def test_wandb_honours_its_environment_and_a_failed_start_blocks_no_retry(
    fresh_accelerator_state, tiny_model, data_files, tmp_path, monkeypatch
):
    """wandb's own variables name the run (WANDB_PROJECT was ignored: runs went to a project named
    after the stage); --run_name names it too. A wandb run that cannot start (no API key) is one error
    line and leaves no args.json to block the retry. Offline: WANDB_MODE=offline writes locally."""
    import wandb

    started = []
    real_init = wandb.init
    monkeypatch.setattr(wandb, "init", lambda **kw: started.append(kw) or real_init(**kw))
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "my-project")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    out = tmp_path / "out"
    run = dict(model_name_or_path=tiny_model, dataset_name=data_files["prompt_completion"],  # noqa: C408
               max_steps=1, output_dir=str(out), report_to="wandb", run_name="first-try")  # fmt: skip
    message = main_error("sft.py", **run)
    assert message.startswith("--report_to wandb: cannot start (") and "API key" in message, message
    assert not (out / "args.json").exists()
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.teardown()  # (wandb keeps its settings per process; a retry is a new process)
    sft.main(sft.Args(**run))  # the retry in the same folder trains
    assert [(kw["project"], kw.get("name")) for kw in started] == [("my-project", "first-try")] * 2
    assert (out / "model.safetensors").exists() and list((tmp_path / "wandb").glob("offline-run-*"))
    wandb.teardown()


def test_resume_matches_uninterrupted_run(
    tiny_model, data_files, run_script, weights, metrics, tmp_path
):
    """8 examples, 3 per step: 3 steps per epoch; the resume from step 4 starts mid-epoch."""
    common = [
        "--model_name_or_path",
        tiny_model,
        "--dataset_name",
        data_files["prompt_completion"],
        "--max_steps",
        6,
        "--per_device_train_batch_size",
        3,
        "--learning_rate",
        1e-3,
        "--save_steps",
        2,
        "--logging_steps",
        1,
        "--seed",
        5,
        "--eval_split",
        "train[:2]",
        "--eval_steps",
        3,
        "--num_samples",
        1,
        "--max_new_tokens",
        3,
    ]
    full = tmp_path / "full"
    run_script("sft.py", *common, "--output_dir", full)
    # our own state is JSON (scheduler included); nothing of ours is pickled
    ckpt = full / "checkpoints" / "step_4"
    assert "scheduler" in json.loads((ckpt / "step.json").read_text())
    assert not list(ckpt.glob("custom_checkpoint_*"))
    # a run killed after logging step 6: its last complete checkpoint (step 4), a half-written one that
    # must be ignored (step_5.tmp), and metrics/samples rows of steps 5-6 that the resume re-runs
    resumed = tmp_path / "resumed"
    shutil.copytree(ckpt, resumed / "checkpoints" / "step_4")
    (resumed / "checkpoints" / "step_5.tmp").mkdir()
    (resumed / "checkpoints" / "step_5.tmp" / "step.json").write_text('{"step": 5}')
    for name in ["args.json", "metrics.jsonl", "samples.jsonl"]:
        shutil.copy(full / name, resumed / name)
    proc = run_script(
        "sft.py", *common, "--output_dir", resumed, "--resume_from_checkpoint", "latest"
    )
    assert "resumed from" in proc.stdout + proc.stderr
    assert max_diff(weights(full), weights(resumed)) <= 1e-6
    # every step once, with the uninterrupted run's values
    assert [r["step"] for r in metrics(resumed)] == [r["step"] for r in metrics(full)]

    def timeless(rows):
        return [{k: v for k, v in r.items() if k != "train/tokens_per_second"} for r in rows]

    for a, b in zip(timeless(metrics(full)), timeless(metrics(resumed))):
        assert b == pytest.approx(a, abs=1e-6)
    epoch = next(r["epoch"] for r in metrics(full) if r["step"] == 4 and "epoch" in r)
    assert epoch == pytest.approx(4 / 3)  # the checkpoint is one step into the second epoch

    def samples(run):
        return [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]

    assert [s["step"] for s in samples(resumed)] == [3, 6]
    assert samples(resumed) == samples(full)


# ---- in-process runs: dtypes, dropout, sampling, non-finite loss, output_dir ----


def run_main(**kwargs):
    sft.main(
        sft.Args(
            **{"per_device_train_batch_size": 4, "save_steps": 0, "logging_steps": 1, **kwargs}
        )
    )


def test_bf16_checkpoint_trains_in_fp32(tiny_model_bf16, data_files, weights, tmp_path):
    run_main(
        model_name_or_path=tiny_model_bf16,
        dataset_name=data_files["prompt_completion"],
        max_steps=1,
        learning_rate=1e-5,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        per_device_train_batch_size=8,
        output_dir=str(tmp_path / "o"),
    )
    w0, w1 = weights(tiny_model_bf16), weights(tmp_path / "o")
    assert {w.dtype for w in w1.values()} == {torch.float32}
    # rows of input embeddings of tokens absent from the data get no gradient: count the rest
    trained = [k for k in w1 if "embed_tokens" not in k]
    changed = sum((w1[k] != w0[k].float()).sum().item() for k in trained) / sum(
        w1[k].numel() for k in trained
    )
    assert changed > 0.9, changed  # in pure bf16 a 1e-5 step is below the weights' resolution
    # --init_from_scratch from a bf16 config builds float32 weights too
    run_main(
        model_name_or_path=tiny_model_bf16,
        init_from_scratch=True,
        max_steps=1,
        dataset_name=data_files["prompt_completion"],
        output_dir=str(tmp_path / "scratch"),
    )
    assert {w.dtype for w in weights(tmp_path / "scratch").values()} == {torch.float32}


def test_greedy_samples_ignore_checkpointing_and_generation_config(
    tiny_model, data_files, tmp_path
):
    """The same greedy samples with --gradient_checkpointing, and with a checkpoint whose
    generation_config.json asks for repetition_penalty / no_repeat_ngram_size (it must not leak in)."""
    leaky = tmp_path / "leaky"
    shutil.copytree(tiny_model, leaky)
    config = json.loads((leaky / "generation_config.json").read_text())
    config.update(repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=6)
    (leaky / "generation_config.json").write_text(json.dumps(config))
    common = {
        "dataset_name": data_files["prompt_completion"],
        "max_steps": 1,
        "eval_split": "train[:4]",
        "num_samples": 4,
        "max_new_tokens": 6,
    }
    samples = {}
    for name, extra in [
        ("plain", {}),
        ("checkpointing", {"gradient_checkpointing": True}),
        ("leaky", {"model_name_or_path": str(leaky)}),
    ]:
        run_main(
            **{
                "model_name_or_path": tiny_model,
                **common,
                **extra,
                "output_dir": str(tmp_path / name),
            }
        )
        samples[name] = [
            json.loads(line)
            for line in (tmp_path / name / "samples.jsonl").read_text().splitlines()
        ]
    assert len(samples["plain"]) == 4
    assert samples["checkpointing"] == samples["plain"]
    assert samples["leaky"] == samples["plain"]


def test_dropout_disabled_in_the_trained_model(dropout_model, data_files, monkeypatch, tmp_path):
    seen, original = [], sft.sft_loss_sum

    def spy(model, batch):  # two train-mode forwards of the model being trained
        if model.training and not seen:
            with torch.no_grad():
                a, b = (
                    model(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                    ).logits
                    for _ in range(2)
                )
            seen.append((a - b).abs().max().item())
        return original(model, batch)

    monkeypatch.setattr(sft, "sft_loss_sum", spy)
    run_main(
        model_name_or_path=dropout_model,
        dataset_name=data_files["prompt_completion"],
        max_steps=1,
        output_dir=str(tmp_path / "o"),
    )
    assert seen == [0.0]


def test_non_finite_loss_stops_before_the_weights_change(
    tiny_model, data_files, monkeypatch, weights, tmp_path
):
    calls, original = [], sft.sft_loss_sum

    def nan_from_step_2(model, batch):
        calls.append(1)
        loss, n = original(model, batch)
        return (loss * float("nan") if len(calls) >= 2 else loss), n

    monkeypatch.setattr(sft, "sft_loss_sum", nan_from_step_2)
    out = tmp_path / "o"
    message = main_error(
        "sft.py",
        model_name_or_path=tiny_model,
        dataset_name=data_files["prompt_completion"],
        max_steps=3,
        per_device_train_batch_size=4,
        save_steps=1,
        output_dir=str(out),
    )
    assert "non-finite train/loss at step 2" in message
    assert (
        not (out / "model.safetensors").exists() and not (out / "checkpoints" / "step_2").exists()
    )
    assert all(torch.isfinite(w).all() for w in weights(out / "checkpoints" / "step_1").values())


def test_output_dir_reuse_needs_overwrite_or_resume(tiny_model, data_files, tmp_path):
    out = tmp_path / "o"
    common = {
        "model_name_or_path": tiny_model,
        "dataset_name": data_files["prompt_completion"],
        "max_steps": 2,
        "output_dir": str(out),
    }
    run_main(**common, save_steps=1)
    assert "already holds a run" in main_error("sft.py", **common, per_device_train_batch_size=4)
    message = main_error(
        "sft.py",
        **common,
        per_device_train_batch_size=4,
        save_steps=1,
        resume_from_checkpoint="latest",
        learning_rate=1e-3,
        seed=7,
    )
    assert message.endswith("learning_rate, seed")
    run_main(
        **common, overwrite_output_dir=True
    )  # replaces the run: its checkpoints and metrics go
    assert not (out / "checkpoints").exists()
    assert [
        json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
    ] == [1, 2]


# ---- data counts (the bad-input table is tests/test_bad_inputs_sft.py) ----


def test_long_prompts_dropped_with_count(tok, tmp_path, capsys):
    rows = [{"prompt": "Q: hi\nA:", "completion": " yes"}] * 3 + [
        {"prompt": "word " * 200, "completion": " no"}
    ]
    ex = sft.tokenize_sft(sft.Dataset.from_list(rows), tok, 32, None, "train")
    assert len(ex) == 3
    assert (
        "train: 3 examples, 0 truncated, 1 dropped (1 prompt leaves no room"
        in capsys.readouterr().out
    )


def test_tokenizer_without_pad_token_uses_eos(tiny_models, data_files, tmp_path, capsys):
    run_main(
        model_name_or_path=tiny_models["llama_nopad"],
        dataset_name=data_files["prompt_completion"],
        max_steps=2,
        per_device_train_batch_size=3,
        output_dir=str(tmp_path / "o"),
    )
    assert "using EOS as pad" in capsys.readouterr().out
    assert (tmp_path / "o" / "model.safetensors").exists()
