"""dpo.py: the loss against hand-computed values, log-probabilities, data shapes, end-to-end runs, errors."""

import json
import math
import re

import pytest
import torch
from accelerate import Accelerator
from conftest import build_sentencepiece_tokenizer, build_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import dpo


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# ---- unit: the loss (Eq. 7), its variants, and the implicit rewards (Eq. 6) ----


def test_dpo_loss_types_against_hand_computed_values():
    # h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)) = (-1 + 1.5) - (-2 + 1) = 1.5
    args = (t(-1.0), t(-2.0), t(-1.5), t(-1.0))
    beta = 0.5
    losses, chosen, rejected = dpo.dpo_loss(*args, beta=beta, loss_type="sigmoid")
    assert losses.item() == pytest.approx(
        math.log(1 + math.exp(-0.75)), abs=1e-12
    )  # -log sigmoid(beta * h)
    assert chosen.item() == pytest.approx(0.25) and rejected.item() == pytest.approx(
        -0.5
    )  # beta * (pi - ref)
    losses, _, _ = dpo.dpo_loss(*args, beta=beta, loss_type="ipo")
    assert losses.item() == pytest.approx((1.5 - 1 / (2 * beta)) ** 2)  # (h - 1/(2 beta))^2 = 0.25
    # conservative DPO is the sigmoid loss with label smoothing (no separate loss type)
    losses, _, _ = dpo.dpo_loss(*args, beta=beta, loss_type="sigmoid", label_smoothing=0.1)
    expected = 0.9 * math.log(1 + math.exp(-0.75)) + 0.1 * math.log(1 + math.exp(0.75))
    assert losses.item() == pytest.approx(expected, abs=1e-12)
    # policy = reference: zero margin, loss log 2, no preference either way
    losses, chosen, rejected = dpo.dpo_loss(t(-3.0), t(-4.0), t(-3.0), t(-4.0), beta=0.1)
    assert losses.item() == pytest.approx(math.log(2)) and chosen.item() == rejected.item() == 0.0
    with pytest.raises(ValueError):
        dpo.dpo_loss(*args, loss_type="hinge")


def test_table1_stateless_case_loss_is_log_1_plus_b_over_a_to_the_beta():
    # Sec. 4.1, Table 1: pi_ref(y1) = pi_ref(y2) = 0.5, one pair y1 > y2, the policy puts a on y1 and b on y2.
    for a, b, beta in [
        (0.5, 0.5, 0.1),
        (0.1, 0.0001, 0.1),
        (0.7, 0.2, 0.5),
        (0.2, 0.7, 1.0),
        (0.1, 1e-12, 0.1),
    ]:
        ref = t(math.log(0.5))
        loss, _, _ = dpo.dpo_loss(t(math.log(a)), t(math.log(b)), ref, ref, beta=beta)
        assert loss.item() == pytest.approx(math.log(1 + (b / a) ** beta), rel=1e-9)
    # b -> 0 minimizes the loss whatever a is: pi_DPO = (0.1, 0, 0.9) of Table 1 is a minimizer
    loss, _, _ = dpo.dpo_loss(
        t(math.log(0.1)), t(-1e4), t(math.log(0.5)), t(math.log(0.5)), beta=0.1
    )
    assert loss.item() < 1e-30


def test_dpo_loss_gradient_flows_to_policy_only():
    pc, pr = torch.tensor([-1.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    losses, chosen, _ = dpo.dpo_loss(pc, pr, torch.tensor([-1.0]), torch.tensor([-1.0]))
    losses.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descent raises log pi(y_w) and lowers log pi(y_l)
    assert not chosen.requires_grad


def test_sequence_logps_sums_completion_tokens_only():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 6, 13), torch.randint(0, 13, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]])
    manual = torch.zeros(2)
    for b in range(2):
        for pos in range(1, 6):
            if mask[b, pos]:
                manual[b] += torch.log_softmax(logits[b, pos - 1], -1)[ids[b, pos]]
    assert torch.allclose(dpo.sequence_logps(logits, ids, mask), manual, atol=1e-5)
    # prompt and padding tokens do not matter: change them, same result
    ids2 = ids.clone()
    ids2[0, :2], ids2[1, 3:] = 7, 7
    logits2 = logits.clone()
    logits2[0, 5], logits2[1, 2:] = 99.0, -5.0  # logits after each row's last completion token
    assert torch.allclose(dpo.sequence_logps(logits2, ids2, mask), manual, atol=1e-5)


def test_concatenated_forward_equals_two_separate_forwards(tok, tiny_models):
    prompt = dpo.encode_prompt(tok, "Q: What is 2 + 2?\nA:")
    pairs = [
        dpo.make_pair(
            prompt,
            dpo.encode_completion(tok, "", " It is 4."),
            dpo.encode_completion(tok, "", " I really do not know, sorry."),
            64,
            None,
        )[0],
        dpo.make_pair(
            prompt[:3],
            dpo.encode_completion(tok, "", " Four, of course it is four."),
            dpo.encode_completion(tok, "", " 5"),
            64,
            None,
        )[0],
    ]
    batch = dpo.collate_pairs(pairs, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4 and batch["completion_mask"][0].sum() == len(
        pairs[0]["chosen_mask"]
    ) - len(prompt)
    for arch in ("llama", "gpt2"):  # gpt2: absolute positions
        model = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
        with torch.no_grad():
            chosen, rejected = dpo.concatenated_forward(model, batch)
            for side, got in (("chosen", chosen), ("rejected", rejected)):
                # each sequence alone, unpadded
                for i, p in enumerate(pairs):
                    ids = torch.tensor([p[f"{side}_input_ids"]])
                    alone = dpo.sequence_logps(
                        model(ids).logits, ids, torch.tensor([p[f"{side}_mask"]])
                    )
                    assert got[i].item() == pytest.approx(alone.item(), abs=1e-4), (arch, side, i)


# ---- unit: data ----


def test_every_preference_shape_gives_prompt_chosen_rejected(tok, data_files):
    expect = {
        "preference": (
            "Q: What is 2 + 2?\nA:",
            " It is 4.<|endoftext|>",
            " I do not know.<|endoftext|>",
        ),
        "preference_messages": (
            "<|user|>\nWhat is 2 + 2?\n<|assistant|>\n",
            "It is 4.<|endoftext|>",
            "I do not know.<|endoftext|>",
        ),
        "hh": (
            "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: What is 2 + 2?\n\nAssistant:",
            " It is 4.<|endoftext|>",
            " I do not know.<|endoftext|>",
        ),
    }
    for shape, (prompt, chosen, rejected) in expect.items():
        pair = dpo.tokenize_preference(
            dpo.to_preference(dpo.load_split(data_files[shape], None, "train")),
            tok,
            512,
            None,
            shape,
        )[0]
        n = pair["chosen_mask"].index(1)
        assert tok.decode(pair["chosen_input_ids"][:n]) == prompt, shape
        assert tok.decode(pair["rejected_input_ids"][:n]) == prompt, shape
        assert (
            tok.decode(pair["chosen_input_ids"][n:]) == chosen and sum(pair["chosen_mask"][:n]) == 0
        ), shape
        assert tok.decode(pair["rejected_input_ids"][n:]) == rejected, shape


def test_truncation_keeps_prompt_end_and_response_start(tok, capsys):
    pair, truncated = dpo.make_pair([1, 2, 3, 4], [5, 6, 7], [8, 9], 5, 2)
    assert (
        truncated
        and pair["chosen_input_ids"] == [3, 4, 5, 6, 7]
        and pair["rejected_input_ids"] == [3, 4, 8, 9]
    )
    assert pair["chosen_mask"] == [0, 0, 1, 1, 1]
    assert dpo.make_pair([1, 2, 3, 4], [5], [6], 4, None) is None
    ds = dpo.Dataset.from_list(
        [
            {"prompt": "word " * 100, "chosen": " a", "rejected": " b"},
            {"prompt": "Q: hi", "chosen": " a", "rejected": " b"},
        ]
    )
    assert len(dpo.tokenize_preference(ds, tok, 20, None, "train")) == 1
    assert "train: 1 pairs, 0 truncated, 1 dropped" in capsys.readouterr().out


def test_prompt_sources_for_dpo_iter(data_files):
    prompts = {
        s: dpo.to_prompts(dpo.load_split(data_files[s], None, "train"))[0]
        for s in ("prompts", "preference", "hh", "messages", "preference_messages")
    }
    assert prompts["prompts"] == prompts["preference"] == "Q: What is 2 + 2?\nA:"
    assert prompts["hh"].endswith("What is 2 + 2?\n\nAssistant:")
    assert prompts["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "Thanks."},
    ]
    assert prompts["preference_messages"] == [{"role": "user", "content": "What is 2 + 2?"}]


def test_best_worst_pairs_skip_ties():
    assert dpo.best_worst_pairs([1.0, 3.0, 2.0, 5.0, 5.0, 5.0, 0.0, -1.0, 0.5], 3) == [
        (1, 0),
        None,
        (8, 7),
    ]


def test_sampled_responses_end_at_their_first_eos(tok):
    """sample_responses cuts each generated response after its first EOS (the padding generate()
    adds after it is dropped); a response with no EOS keeps all its tokens, a pad id inside it too."""
    eos, pad_id = tok.eos_token_id, tok.pad_token_id
    assert eos != pad_id
    rows = [[4, 5, eos, pad_id, pad_id], [4, pad_id, 6, 7, 8], [eos, eos, pad_id, pad_id, pad_id]]

    class Generator(torch.nn.Module):  # stands in for the policy: generate() returns `rows`
        generation_config = None

        def generate(self, input_ids, attention_mask, generation_config, synced_gpus):
            prompts = input_ids.repeat_interleave(generation_config.num_return_sequences, 0)
            return torch.cat([prompts, torch.tensor(rows)], 1)

    args = dpo.Args(samples_per_prompt=3, max_new_tokens=5)
    samples = dpo.sample_responses(Accelerator(cpu=True), Generator(), tok, [[9, 10]], args)
    assert samples == [([4, 5, eos], True), ([4, pad_id, 6, 7, 8], False), ([eos], True)]
    assert all(type(f) is bool for _, f in samples)


def test_reward_model_inputs_retokenize_when_vocabularies_differ(tok):
    other = build_tokenizer(pad=True)
    other.add_tokens(["<extra>"])  # a different vocabulary
    prompt_ids = dpo.encode_prompt(tok, "Q: hi\nA:")
    response = tok(" Paris.", add_special_tokens=False).input_ids + [tok.eos_token_id]
    # the same vocabulary (load_reward_tokenizer gives None): the sampled ids as they are
    assert (
        dpo.reward_model_inputs(tok, None, "Q: hi\nA:", prompt_ids, response, True)
        == prompt_ids + response
    )
    ids = dpo.reward_model_inputs(tok, other, "Q: hi\nA:", prompt_ids, response, True)
    assert other.decode(ids) == "Q: hi\nA: Paris.<|endoftext|>"
    assert (
        other.decode(
            dpo.reward_model_inputs(tok, other, "Q: hi\nA:", prompt_ids, response[:-1], False)
        )
        == "Q: hi\nA: Paris."
    )
    chat = [{"role": "user", "content": "hi"}]
    ids = dpo.reward_model_inputs(tok, other, chat, dpo.encode_prompt(tok, chat), response, True)
    assert other.decode(ids) == "<|user|>\nhi\n<|assistant|>\n Paris.<|endoftext|>"


def test_reward_fn_loading_and_checks(tmp_path):
    (tmp_path / "r.py").write_text(
        "def good(p, c):\n    return [len(x) for x in c]\ndef short(p, c):\n    return [1.0]\n"
    )
    fn = dpo.load_reward_fn(f"{tmp_path / 'r.py'}:good")
    assert dpo.call_reward_fn(fn, ["a", "b"], ["xy", "z"], [True, False]) == [2.0, 1.0]
    with pytest.raises(dpo.DataError, match="returned 1 scores for 2 completions"):
        dpo.call_reward_fn(
            dpo.load_reward_fn(f"{tmp_path / 'r.py'}:short"), ["a", "b"], ["x", "y"], [True, True]
        )
    for spec, needle in [
        (f"{tmp_path / 'r.py'}:missing", "no function 'missing'"),
        (f"{tmp_path / 'nope.py'}:good", "no such file"),
        ("r.py", "expected 'path/to/file.py:function'"),
    ]:
        with pytest.raises(dpo.DataError, match=re.escape(needle)):
            dpo.load_reward_fn(spec)


def test_argument_validation():
    bad = [
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "not to ipo"),
        ({"beta": 0.0}, "beta"),
        ({"iterations": 2}, "needs --reward_model_name_or_path or --reward_fn"),
        ({"reward_fn": "a.py:f", "reward_model_name_or_path": "rm"}, "not both"),
        ({"reward_fn": "a.py:f", "samples_per_prompt": 1}, "samples_per_prompt >= 2"),
        ({"eval_only": True}, "needs --eval_split"),
    ]
    for kwargs, needle in bad:
        with pytest.raises(dpo.DataError, match=re.escape(needle)):
            dpo.check_args(dpo.Args(**kwargs))
    assert dpo.check_args(dpo.Args(reward_fn="a.py:f", iterations=3)) is True


# ---- end to end ----


@pytest.mark.parametrize(
    "model,shape,extra",
    [
        ("gpt2", "preference_messages", ["--loss_type", "ipo"]),
        ("llama_nopad", "hh", ["--loss_type", "sigmoid", "--label_smoothing", 0.1]),
    ],
)
def test_end_to_end(model, shape, extra, tiny_models, data_files, run_script, metrics, tmp_path):
    out = tmp_path / "out"
    proc = run_script(
        "dpo.py",
        "--model_name_or_path",
        tiny_models[model],
        "--dataset_name",
        data_files[shape],
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
        "--learning_rate",
        1e-3,
        "--output_dir",
        out,
        *extra,
    )
    for name in [
        "args.json",
        "metrics.jsonl",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "checkpoints/step_2/step.json",
    ]:
        assert (out / name).exists(), name
    assert json.loads((out / "args.json").read_text())["loss_type"] == extra[1]
    first = "1 process, device cpu, fp32, global batch 2 pairs (2 per device x 1 x 1 accumulation)"
    assert proc.stdout.splitlines()[0] == first, proc.stdout[:300]
    rows = metrics(out)
    train = [r for r in rows if "train/loss" in r]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in train] == [2, 4] and [r["step"] for r in evals] == [0, 2, 4]
    names = [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ]
    assert set(names + ["train/lr", "train/tokens_per_second", "train/pairs_per_second"]) <= set(
        train[0]
    )
    assert {f"eval/{n}" for n in names} <= set(evals[0])
    for r in rows:
        assert all(math.isfinite(float(v)) for v in r.values())
    assert evals[0]["eval/rewards/margins"] == 0.0  # step 0: policy = reference
    assert evals[-1]["eval/rewards/margins"] > 0  # it trained towards the chosen responses
    if model == "llama_nopad":
        assert "using EOS as pad" in proc.stdout
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded(torch.tensor([[1, 2, 3]])).logits.shape[-1] == len(
        AutoTokenizer.from_pretrained(out)
    )


def test_eval_only_writes_eval_metrics_without_training(
    tiny_models, data_files, run_script, metrics, tmp_path
):
    out = tmp_path / "eval"
    proc = run_script(
        "dpo.py",
        "--model_name_or_path",
        tiny_models["qwen2"],
        "--ref_model_name_or_path",
        tiny_models["llama"],
        "--dataset_name",
        data_files["preference"],
        "--eval_split",
        "train",
        "--eval_only",
        "--output_dir",
        out,
        "--tokenizer_name_or_path",
        tiny_models["llama"],
    )
    rows = metrics(out)
    assert len(rows) == 1 and rows[0]["step"] == 0 and not (out / "model.safetensors").exists()
    assert rows[0]["eval/rewards/margins"] != 0  # a different reference: non-zero implicit rewards
    assert json.loads(proc.stdout.strip().splitlines()[-1])["eval/loss"] == pytest.approx(
        rows[0]["eval/loss"]
    )


# ---- ChatML EOS, dropout, identical pairs, missing-EOS penalty ----


def test_chatml_completions_end_in_exactly_one_eos(chatml_model):
    """Qwen-style ChatML ('<|im_end|>' is the EOS and is followed by '\\n'): training responses end in one
    '<|im_end|>', where generation stops, not '<|im_end|>\\n<|im_end|>'; the same in the re-tokenization
    path for a reward model with another vocabulary (D10): an unfinished response gets no end of turn."""
    tok = AutoTokenizer.from_pretrained(chatml_model)
    ds = dpo.Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": "hi"}],
                "chosen": [{"role": "assistant", "content": "hello there"}],
                "rejected": [{"role": "assistant", "content": "no"}],
            }
        ]
    )
    (pair,) = dpo.tokenize_preference(ds, tok, 128, None, "chatml")
    for side in ("chosen", "rejected"):
        ids = pair[f"{side}_input_ids"][pair[f"{side}_mask"].index(1) :]
        assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1, (
            tok.convert_ids_to_tokens(ids)
        )
    plain = build_tokenizer(
        pad=True
    )  # the policy's vocabulary differs from the ChatML reward model's
    chat = [{"role": "user", "content": "hi"}]
    response = plain("hello", add_special_tokens=False).input_ids
    finished = dpo.reward_model_inputs(plain, tok, chat, [], response + [plain.eos_token_id], True)
    assert (
        finished[-1] == tok.eos_token_id and finished.count(tok.eos_token_id) == 2
    )  # the prompt's turn + ours
    assert tok.decode(finished).endswith("<|im_start|>assistant\nhello<|im_end|>")
    unfinished = dpo.reward_model_inputs(plain, tok, chat, [], response, False)
    assert tok.decode(unfinished).endswith("<|im_start|>assistant\nhello")


def test_dropout_is_off_including_attention_dropout_from_the_config(dropout_model):
    model = dpo.load_policy(dpo.Args(), dropout_model).train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    torch.manual_seed(0)
    first = model(ids).logits
    second = model(ids).logits
    assert torch.equal(first, second)


def test_identical_pairs_are_dropped_and_counted(tok, capsys):
    ds = dpo.Dataset.from_list(
        [
            {"prompt": "Q: a", "chosen": " x", "rejected": " x"},
            {"prompt": "Q: b", "chosen": " y", "rejected": " z"},
        ]
    )
    assert len(dpo.tokenize_preference(ds, tok, 64, None, "train")) == 1
    assert "1 dropped (chosen identical to rejected)" in capsys.readouterr().out


def test_an_empty_prompt_still_scores_the_first_response_token(tok, tiny_model):
    """With no prompt and a tokenizer that adds no BOS, the response's first token had no position
    to be predicted from and was never scored (a one-token preference was scored on its EOS alone).
    BOS is the context, so log pi(y|x) sums every response token given BOS, as in sft.py."""
    assert tok("").input_ids == []  # this tokenizer adds no BOS
    ds = dpo.Dataset.from_list([{"prompt": "", "chosen": " yes", "rejected": " no"}])
    (pair,) = dpo.tokenize_preference(ds, tok, 64, None, "train")
    yes = tok(" yes", add_special_tokens=False).input_ids + [tok.eos_token_id]
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        chosen, _ = dpo.concatenated_forward(model, dpo.collate_pairs([pair], tok.pad_token_id))
        logps = torch.log_softmax(model(torch.tensor([[tok.bos_token_id, *yes]])).logits[0], -1)
    expected = sum(logps[i, token] for i, token in enumerate(yes))  # every response token
    assert chosen.item() == pytest.approx(expected.item(), abs=1e-5)
    assert pair["chosen_input_ids"] == [tok.bos_token_id, *yes]
    assert pair["chosen_mask"] == [0] + [1] * len(yes)


def test_missing_eos_penalty_applies_to_reward_functions_that_see_finished(tok):
    seen = {}

    def score(prompts, completions, finished):
        seen["finished"] = finished
        return [10.0] * len(completions)

    samples = [([5, 6, tok.eos_token_id], True), ([5, 6, 7], False)]
    prompts = [{"prompt": "Q:", "prompt_ids": [1]}] * 2
    args = dpo.Args(missing_eos_penalty=-1.0)
    assert dpo.score_samples(None, args, tok, score, None, None, prompts, samples) == [10.0, -1.0]
    assert seen["finished"] == [True, False]
    args = dpo.Args()  # None: no penalty
    assert dpo.score_samples(None, args, tok, score, None, None, prompts, samples) == [10.0, 10.0]


def test_a_sentencepiece_response_keeps_its_leading_space_for_labellers(tok):
    """Decoded alone, '▁Paris.' reads 'Paris.': the reward function and a reward model with another
    vocabulary (byte-level BPE, where ' Paris' and 'Paris' differ) would see 'France?Paris.'."""
    sp = build_sentencepiece_tokenizer()
    prompt = "Capital of France?"
    prompt_ids = sp(prompt).input_ids
    response = sp(" Paris.", add_special_tokens=False).input_ids + [sp.eos_token_id]
    assert sp.decode(response, skip_special_tokens=True) == "Paris."  # the pitfall
    assert dpo.decode_response(sp, prompt_ids, response) == " Paris."
    ids = dpo.reward_model_inputs(sp, tok, prompt, prompt_ids, response, True)
    assert ids == tok("Capital of France? Paris.").input_ids + [tok.eos_token_id]
    seen = {}

    def score(prompts, completions):
        seen["completions"] = completions
        return [1.0] * len(completions)

    samples = [(response, True)]
    dpo.score_samples(
        None,
        dpo.Args(),
        sp,
        score,
        None,
        None,
        [{"prompt": prompt, "prompt_ids": prompt_ids}],
        samples,
    )
    assert seen["completions"] == [" Paris."]
