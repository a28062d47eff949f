"""The tiny pipeline's task, its gold reward and the labellers of known accuracy.

Task: sort a short string of digits ("sort 3 1 4 =" -> " 1 3 4"). The gold reward gives partial
credit per position and charges for a wrong length, so it is graded, not 0/1.

The labellers are reward functions in the `--reward_fn path.py:name` form that dpo.py (DPO-Iter)
and ppo.py call: `fn(prompts, completions, finished=None) -> scores`. The scripts themselves replace
an unfinished completion's score with `--missing_eos_penalty`, so the labellers score the text only.
"""

import math
import random
import re


def make_prompt(rng: random.Random, lo: int, hi: int) -> str:
    return "sort " + " ".join(str(rng.randrange(10)) for _ in range(rng.randint(lo, hi))) + " ="


def target(prompt: str) -> list:
    return sorted(re.findall(r"\d", prompt))


def answer(prompt: str) -> str:
    """The correct completion (leading space: the tokenizer splits on whitespace)."""
    return " " + " ".join(target(prompt))


def gold_reward(prompt: str, completion: str) -> float:
    """Partial credit per correct position, minus one per missing or extra digit, over the length."""
    want, got = target(prompt), re.findall(r"\d", completion)
    hits = sum(a == b for a, b in zip(want, got))
    return (hits - abs(len(got) - len(want))) / len(want)


def gold_reward_fn(prompts: list, completions: list, finished=None) -> list:
    """The gold labeller (accuracy 1.0)."""
    return [gold_reward(p, c) for p, c in zip(prompts, completions)]


class NoisyGold:
    """Gold plus Gumbel noise of scale `temperature`, drawn afresh for every completion scored. The
    difference of two Gumbels is logistic, so comparing two scored completions is exactly a
    Bradley-Terry labeller: P(a preferred to b) = sigmoid((gold(a) - gold(b)) / temperature)."""

    def __init__(self, temperature: float, seed: int):
        self.temperature, self.rng = temperature, random.Random(seed)

    def __call__(self, prompts: list, completions: list, finished=None) -> list:
        return [
            gold_reward(p, c) + self.temperature * gumbel(self.rng)
            for p, c in zip(prompts, completions)
        ]


def gumbel(rng: random.Random) -> float:
    return -math.log(-math.log(max(rng.random(), 1e-12)))


def pairwise_accuracy(gold_gaps: list, temperature: float) -> float:
    """Expected accuracy of a Bradley-Terry labeller of this temperature on pairs with these |gold gaps|."""
    if temperature <= 0:
        return 1.0
    return sum(1 / (1 + math.exp(-min(g / temperature, 50.0))) for g in gold_gaps) / len(gold_gaps)


def calibrate_temperature(gold_gaps: list, accuracy: float) -> float:
    """The temperature whose expected pairwise accuracy on these pairs is `accuracy` (bisection in log)."""
    lo, hi = 1e-4, 1e3
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if pairwise_accuracy(gold_gaps, mid) > accuracy else (lo, mid)
    return math.sqrt(lo * hi)


def corrupt(answer: list, rng: random.Random) -> list:
    """The behaviour policy of the offline preference data: the right answer with 0-3 random edits
    (swap neighbours, replace, drop, duplicate or append digits), so wrong lengths are covered too."""
    out = list(answer)
    for _ in range(rng.choice([0, 1, 1, 2, 2, 3])):
        kind, i = rng.randrange(5), rng.randrange(len(out))
        if kind == 0 and len(out) > 1:  # swap two neighbours
            j = min(i + 1, len(out) - 1)
            out[i], out[j] = out[j], out[i]
        elif kind == 1:  # replace a digit
            out[i] = str(rng.randrange(10))
        elif kind == 2 and len(out) > 1:  # drop a digit
            out.pop(i)
        elif kind == 3:  # duplicate a digit
            out.insert(i, out[i])
        else:  # append one to three digits (over-long answers)
            out += [str(rng.randrange(10)) for _ in range(rng.randint(1, 3))]
    return out
