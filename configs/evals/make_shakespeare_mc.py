"""Writes shakespeare_mc.jsonl: a 4-way multiple-choice task made from the shipped corpus.

Each example is two lines of verse or dialogue as the context and the first words of the line that follows
as the right choice; the three others are the same words shuffled. Every word is led by a space, so the
byte-level pre-tokenizer cuts each choice into the same pieces and any tokenizer gives all four choices
the same number of tokens: an untrained model, whose likelihood mostly counts tokens, is at the 25% of
chance, and a model that has learnt how the text goes prefers the true order (the smoke run's `tiny`
scores well above chance). Deterministic (seeded):

    python configs/evals/make_shakespeare_mc.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "data" / "shakespeare.jsonl"
EXAMPLES, WORDS, CHOICES = 200, 6, 4


def main() -> None:
    lines = [
        ln.strip()
        for row in map(json.loads, CORPUS.read_text().splitlines())
        for ln in row["text"].split("\n")
    ]
    rng = random.Random(0)
    usable = [
        i for i in range(2, len(lines)) if all(len(lines[j].split()) >= WORDS for j in (i - 2, i - 1, i))
    ]
    out = []
    for i in rng.sample(usable, EXAMPLES):
        words = lines[i].split()[:WORDS]
        right, choices = " " + " ".join(words), [" " + " ".join(words)]
        while len(choices) < CHOICES:
            shuffled = " " + " ".join(rng.sample(words, len(words)))
            if shuffled not in choices:
                choices.append(shuffled)
        rng.shuffle(choices)
        context = f"{lines[i - 2]}\n{lines[i - 1]}\n"
        out.append({"context": context, "choices": choices, "label": choices.index(right)})
    with open(HERE / "shakespeare_mc.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in out)


if __name__ == "__main__":
    main()
