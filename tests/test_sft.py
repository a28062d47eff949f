"""sft.py: unit tests of the data path and loss masking, end-to-end runs, learning, DDP, resume, errors."""

import json
import shutil

import pytest
import torch
from conftest import ARCHS, assert_one_line_error, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

import sft


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


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
    assert unmasked_text(tok, ex) == "<|system|>\nBe brief.\n<|user|>\nWhat is 2 + 2?\n<|assistant|>\n<|user|>\nThanks.\n<|assistant|>\n"
    # the ids are exactly the tokenization of the rendered conversation pieces
    full = tok.apply_chat_template(ds[0]["messages"], tokenize=False)
    assert tok.decode(ex["input_ids"]) == full


def test_preference_data_trains_on_chosen(tok, data_files):
    for shape, prompt in [("preference", "Q: What is 2 + 2?\nA:"),
                          ("hh", "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: What is 2 + 2?\n\nAssistant:")]:
        ex = sft.tokenize_sft(sft.to_sft(sft.load_split(data_files[shape], None, "train")), tok, 512, None, "t")[0]
        assert masked_text(tok, ex) == " It is 4.<|endoftext|>", shape
        assert unmasked_text(tok, ex) == prompt, shape
    ex = sft.tokenize_sft(sft.to_sft(sft.load_split(data_files["preference_messages"], None, "train")),
                          tok, 512, None, "t")[0]
    assert masked_text(tok, ex) == "It is 4.<|endoftext|>"
    assert unmasked_text(tok, ex) == "<|user|>\nWhat is 2 + 2?\n<|assistant|>\n"


def test_saferlhf_construction_and_filters(data_files):
    ds = sft.load_split(data_files["saferlhf"], None, "train")
    pref = sft.to_preference(ds)
    for row, out in zip(ds, pref):
        s0, s1 = row["is_response_0_safe"], row["is_response_1_safe"]
        win = row["safer_response_id"] if s0 != s1 else row["better_response_id"]
        assert out["chosen"] == row[f"response_{win}"] and out["rejected"] == row[f"response_{1 - win}"]
    n_dual_safe = sum(r["is_response_0_safe"] and r["is_response_1_safe"] for r in ds)
    n_dual_unsafe = sum(not r["is_response_0_safe"] and not r["is_response_1_safe"] for r in ds)
    assert n_dual_safe > 0 and n_dual_unsafe > 0
    assert len(sft.to_preference(ds, "dual_safe")) == len(ds) - n_dual_safe
    assert len(sft.to_preference(ds, "dual_unsafe")) == len(ds) - n_dual_unsafe


def test_hh_split_at_last_assistant_turn():
    chosen = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: good answer"
    rejected = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: bad"
    prompt, c, r = sft.split_hh_transcript(chosen, rejected)
    assert prompt == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    assert (c, r) == (" good answer", " bad")
    with pytest.raises(sft.DataError):
        sft.split_hh_transcript("no assistant turn", "no assistant turn")


def test_padding_carries_no_loss_and_loss_is_completion_nll(tok, tiny_model):
    examples = [{"input_ids": [5, 6, 7, 8, 9], "loss_mask": [0, 0, 1, 1, 1]},
                {"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}]
    batch = sft.collate_sft(examples, tok.pad_token_id)
    assert batch["input_ids"][1].tolist() == [5, 6, 7, tok.pad_token_id, tok.pad_token_id]
    assert batch["loss_mask"][1].tolist() == [0, 1, 1, 0, 0]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    loss_sum, n = sft.sft_loss_sum(model, batch)
    # independent reference: each sequence alone, unpadded, NLL of its completion tokens
    ref = 0.0
    for e in examples:
        ids = torch.tensor([e["input_ids"]])
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        ref -= sum(logp[t - 1, e["input_ids"][t]] for t in range(1, len(ids[0])) if e["loss_mask"][t])
    assert n.item() == 5
    assert loss_sum.item() == pytest.approx(ref.item(), abs=1e-4)


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
    run_script("sft.py", "--model_name_or_path", tiny_models[arch], "--dataset_name", data_files["messages"],
               "--eval_split", "train[:4]", "--max_steps", 4, "--per_device_train_batch_size", 2,
               "--logging_steps", 2, "--eval_steps", 2, "--save_steps", 2, "--max_new_tokens", 4,
               "--output_dir", out)
    for name in ["args.json", "metrics.jsonl", "samples.jsonl", "config.json", "model.safetensors",
                 "tokenizer.json", "checkpoints/step_2/step.json"]:
        assert (out / name).exists(), name
    assert json.loads((out / "args.json").read_text())["max_steps"] == 4
    rows = metrics(out)
    train = [r for r in rows if "train/loss" in r]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in train] == [2, 4] and [r["step"] for r in evals] == [2, 4]
    for r in rows:
        assert all(torch.isfinite(torch.tensor(float(v))) for v in r.values())
    assert {"train/lr", "train/tokens_per_second"} <= set(train[0]) and "eval/perplexity" in evals[0]
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Q: hi", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == len(tokenizer)


# ---- learning ----


def test_learns_to_reproduce_completions(tiny_model, run_script, tmp_path):
    pairs = [(f"Q{i}: {w}?\nA:", f" {a}") for i, (w, a) in enumerate(
        [("red", "apple"), ("blue", "sky"), ("green", "grass"), ("black", "night"),
         ("white", "snow"), ("gold", "sun"), ("grey", "stone"), ("pink", "rose")])]
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "completion": c} for p, c in pairs])
    out = tmp_path / "out"
    run_script("sft.py", "--model_name_or_path", tiny_model, "--init_from_scratch", "--dataset_name", data,
               "--max_steps", 300, "--per_device_train_batch_size", 8, "--learning_rate", 3e-3,
               "--lr_scheduler", "constant", "--warmup_ratio", 0, "--logging_steps", 50, "--save_steps", 0,
               "--output_dir", out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    hits = 0
    for p, c in pairs:
        ids = tok(p, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        hits += tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True) == c
    assert hits >= 7, f"only {hits}/8 completions reproduced"


# ---- multi-process and resume ----


def test_two_processes_match_one_process(tiny_model, data_files, run_script, run_accelerate, weights, tmp_path):
    common = ["--model_name_or_path", tiny_model, "--dataset_name", data_files["prompt_completion"],
              "--max_steps", 4, "--learning_rate", 1e-3, "--save_steps", 0, "--logging_steps", 1, "--seed", 3]
    run_script("sft.py", *common, "--per_device_train_batch_size", 4, "--output_dir", tmp_path / "one")
    run_accelerate("sft.py", *common, "--per_device_train_batch_size", 2, "--output_dir", tmp_path / "two")
    w1, w2, w0 = weights(tmp_path / "one"), weights(tmp_path / "two"), weights(tiny_model)
    assert w1.keys() == w2.keys()
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w1)
    assert moved > 1e-3  # the runs trained
    assert diff <= 1e-4, diff


def test_resume_matches_uninterrupted_run(tiny_model, data_files, run_script, weights, metrics, tmp_path):
    common = ["--model_name_or_path", tiny_model, "--dataset_name", data_files["prompt_completion"],
              "--max_steps", 6, "--per_device_train_batch_size", 3, "--learning_rate", 1e-3,
              "--save_steps", 3, "--logging_steps", 1, "--seed", 5]
    full = tmp_path / "full"
    run_script("sft.py", *common, "--output_dir", full)
    # a run killed after step 3: its last complete checkpoint, plus a half-written one that must be ignored
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    (resumed / "checkpoints" / "step_5.tmp").mkdir()
    proc = run_script("sft.py", *common, "--output_dir", resumed, "--resume_from_checkpoint", "latest")
    assert "resumed from" in proc.stdout + proc.stderr
    assert [r["step"] for r in metrics(resumed)] == [4, 5, 6]  # 3 steps to 6 (8 examples: 2 steps/epoch)
    w1, w2 = weights(full), weights(resumed)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= 1e-5
    losses = {r["step"]: r["train/loss"] for r in metrics(full)}
    for r in metrics(resumed):
        assert r["train/loss"] == pytest.approx(losses[r["step"]], abs=1e-5)


# ---- bad input: one clear line, non-zero exit, before any model loads ----


def test_bad_input_errors(tiny_model, data_files, run_script, tmp_path):
    base = ["--model_name_or_path", tiny_model, "--max_steps", 1, "--output_dir", tmp_path / "o"]
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"text": "hello"}])
    assert_one_line_error(run_script("sft.py", *base, "--dataset_name", wrong, check=False),
                          "['text']", "prompt+completion", "messages")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_one_line_error(run_script("sft.py", *base, "--dataset_name", empty, check=False), "empty")
    assert_one_line_error(run_script("sft.py", *base, "--dataset_name", tmp_path / "missing.jsonl", check=False),
                          "no such file")
    # every prompt longer than max_length: nothing to train on
    assert_one_line_error(run_script("sft.py", *base, "--dataset_name", data_files["prompt_completion"],
                                     "--max_length", 4, check=False), "no example left", "max_length=4")
    # the model directory was never needed: bad input fails before loading it
    assert_one_line_error(run_script("sft.py", "--model_name_or_path", tmp_path / "no_model_here",
                                     "--tokenizer_name_or_path", tiny_model, "--dataset_name", wrong,
                                     "--output_dir", tmp_path / "o", check=False), "['text']")
    assert not (tmp_path / "o").exists()


def test_long_prompts_dropped_with_count(tiny_model, run_script, tmp_path):
    rows = [{"prompt": "Q: hi\nA:", "completion": " yes"}] * 3 + [{"prompt": "word " * 200, "completion": " no"}]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    proc = run_script("sft.py", "--model_name_or_path", tiny_model, "--dataset_name", data, "--max_length", 32,
                      "--max_steps", 1, "--per_device_train_batch_size", 2, "--output_dir", tmp_path / "o")
    assert "train: 3 examples, 0 truncated, 1 dropped" in proc.stdout


def test_tokenizer_without_pad_token_uses_eos(tiny_models, data_files, run_script, tmp_path):
    proc = run_script("sft.py", "--model_name_or_path", tiny_models["llama_nopad"], "--dataset_name",
                      data_files["prompt_completion"], "--max_steps", 2, "--per_device_train_batch_size", 3,
                      "--output_dir", tmp_path / "o")
    assert "using EOS as pad" in proc.stdout
    assert (tmp_path / "o" / "model.safetensors").exists()
