"""What a labeller reads, one contract for ppo.py and dpo.py's DPO-Iter (the shared helpers
labeller_texts and reward_model_inputs): a reward function gets the same prompt and completion texts in
both stages, and a reward model with another vocabulary gets the completion tokenized after its prompt,
in its own chat template."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import CHATML_TEMPLATE, build_config, build_sentencepiece_tokenizer, build_tokenizer
from transformers import AutoModelForSequenceClassification

import dpo
import ppo

RECORDING_REWARD = '''
import json
from pathlib import Path


def record(prompts, completions, finished):
    """Writes what it was given, then stops the run: the test needs nothing after the labelling."""
    with open(Path(__file__).parent / "seen.jsonl", "a") as f:
        f.write(json.dumps(sorted(set(zip(prompts, completions, finished)))) + "\\n")
    raise RuntimeError("labelled")
'''


def test_a_reward_function_reads_the_same_chat_texts_in_ppo_and_dpo_iter(
    tiny_model, data_files, tok, tmp_path
):
    """The same policy, greedy (top_k=1), on the same conversations: ppo.py's rollout and DPO-Iter's
    sampling give the reward function the same (prompt, completion, finished) triples, and the prompt
    is the chat template's rendering (ppo.py used to decode the prompt ids, its special tokens dropped:
    '\\nBe brief.\\n...' instead of '<|system|>\\nBe brief.\\n...')."""
    seen = {}
    for stage in ("ppo", "dpo"):
        d = tmp_path / stage
        d.mkdir()
        (d / "reward.py").write_text(RECORDING_REWARD)
        common = dict(model_name_or_path=tiny_model, dataset_name=data_files["messages"],  # noqa: C408
                      reward_fn=f"{d / 'reward.py'}:record", max_new_tokens=6, top_k=1,
                      output_dir=str(d / "out"))  # fmt: skip
        if stage == "ppo":
            args = ppo.Args(**common, per_device_prompt_batch_size=8, samples_per_prompt=2,
                            num_minibatches=1, per_device_train_batch_size=16)  # fmt: skip
        else:
            args = dpo.Args(**common, samples_per_prompt=2, max_steps=1)
        with pytest.raises(ValueError, match=r"raised RuntimeError at reward.py:\d+ \(labelled\)"):
            (ppo if stage == "ppo" else dpo).main(args)
        (line,) = (d / "seen.jsonl").read_text().splitlines()
        seen[stage] = [tuple(t) for t in json.loads(line)]
    conversations = ppo.to_prompts(ppo.load_split(data_files["messages"], None, "train"))
    rendered = {ppo.render_chat(tok, m, add_generation_prompt=True) for m in conversations}
    assert {p for p, _, _ in seen["ppo"]} == rendered, seen["ppo"][0][0]
    assert seen["ppo"] == seen["dpo"]
    assert len(seen["ppo"]) == len(conversations)


def reward_model_for(tokenizer):
    torch.manual_seed(0)
    config = build_config("llama", tokenizer)
    config.num_labels = 1
    return AutoModelForSequenceClassification.from_config(config).eval()


def scores_of(rm, sequences):
    """The reward model's head at the last token of each sequence, scored alone."""
    with torch.no_grad():
        return [
            ppo.score_tokens(rm, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0, -1]
            for s in sequences
        ]


def ppo_scores(policy_tok, rm_tok, rm, originals, responses, finished):
    """ppo.py's Scorer on left-padded prompts and right-padded responses, as its rollout makes them."""
    rows = [{"prompt": o, "prompt_ids": ppo.encode_prompt(policy_tok, o)} for o in originals]
    batch = ppo.collate_prompts(rows, policy_tok.pad_token_id)
    eos, pad_id = policy_tok.eos_token_id, policy_tok.pad_token_id
    width = max(len(r) for r in responses) + 1
    ended = [r + [eos] if f else r for r, f in zip(responses, finished)]
    padded = [r + [pad_id] * (width - len(r)) for r in ended]
    out, mask, has_eos = ppo.truncate_after_eos(torch.tensor(padded), eos, pad_id)
    assert has_eos.tolist() == finished
    args = SimpleNamespace(normalize_reward=False, local_rollout_forward_batch_size=2)
    scorer = ppo.Scorer(args, policy_tok, torch.device("cpu"), rm, rm_tok)
    return scorer(batch["input_ids"], batch["attention_mask"], out, mask, has_eos, batch["prompt"])


def test_a_legacy_sentencepiece_reward_model_reads_the_completion_after_its_prompt(tok):
    """Tokenized alone, ' Paris.' is '▁', '▁Paris.' for a legacy SentencePiece tokenizer: the reward
    model would read 'Capital of France? ▁ Paris.', a sequence it never saw in training. After its
    prompt it is '▁Paris.', as in the text the reward model was trained on."""
    sp = build_sentencepiece_tokenizer(legacy=True)
    prompt, response = "Capital of France?", tok(" Paris.", add_special_tokens=False).input_ids
    together = sp("Capital of France? Paris.").input_ids
    assert sp.convert_ids_to_tokens(together) == ["▁Capital", "▁of", "▁France?", "▁Paris."]
    expected = {False: together, True: together + [sp.eos_token_id]}
    prompt_ids = dpo.encode_prompt(tok, prompt)
    for finished in (False, True):  # dpo.py: the unfinished branch, and the finished one
        ids = dpo.reward_model_inputs(tok, sp, prompt, prompt_ids, response, finished)
        assert sp.convert_ids_to_tokens(ids) == sp.convert_ids_to_tokens(expected[finished])
    rm = reward_model_for(sp)  # ppo.py: the Scorer's scores are the reward model's on those ids
    scores = ppo_scores(tok, sp, rm, [prompt, prompt], [response, response], [False, True])
    assert torch.allclose(scores, torch.stack(scores_of(rm, [expected[False], expected[True]])))


def test_a_chat_prompt_reaches_a_reward_model_of_another_vocabulary_in_its_own_template(tok):
    """The policy's template is '<|user|>\\n...'; the reward model's, ChatML. ppo.py used to decode the
    prompt ids (special tokens dropped) and re-tokenize that text: the reward model read '\\nhi\\n\\n
    Paris.', in no template at all. Finished: the reward model's end of turn (its EOS); unfinished: an
    open turn."""
    rm_tok = build_tokenizer(pad=True)
    rm_tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    rm_tok.eos_token, rm_tok.chat_template = "<|im_end|>", CHATML_TEMPLATE
    chat = [{"role": "user", "content": "hi"}]
    response = tok(" Paris.", add_special_tokens=False).input_ids
    open_turn = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n Paris."
    expected = {
        False: rm_tok(open_turn, add_special_tokens=False).input_ids,
        True: rm_tok(open_turn + "<|im_end|>", add_special_tokens=False).input_ids,
    }
    prompt_ids = dpo.encode_prompt(tok, chat)
    for finished in (False, True):
        ids = dpo.reward_model_inputs(tok, rm_tok, chat, prompt_ids, response, finished)
        assert rm_tok.decode(ids) == rm_tok.decode(expected[finished])
    rm = reward_model_for(rm_tok)
    scores = ppo_scores(tok, rm_tok, rm, [chat, chat], [response, response], [False, True])
    assert torch.allclose(scores, torch.stack(scores_of(rm, [expected[False], expected[True]])))
    # a reward model with no chat template reads the prompt as the labeller does (the policy's template)
    sp = build_sentencepiece_tokenizer(legacy=True)
    assert sp.chat_template is None
    ids = dpo.reward_model_inputs(tok, sp, chat, prompt_ids, response, True)
    rendered = dpo.render_chat(tok, chat, add_generation_prompt=True)
    assert ids == dpo.encode_prompt(sp, rendered) + dpo.encode_completion(sp, rendered, " Paris.")
