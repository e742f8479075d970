"""Multiple-choice tasks: what they are and where they come from (no torch: launch checks them).

A task is a known hub task read through `datasets`, its fields mapped (HUB_TASKS), a task shipped in
configs/evals (named by its file's stem), or any JSONL file of {context, choices, label} rows. model/evals.py
scores them.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from model.config import CONFIGS_DIR
from model.errors import ConfigError

SHIPPED = CONFIGS_DIR / "evals"  # tasks shipped with lmctl, named by their file's stem


@dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...]
    label: int


def _hellaswag(row: dict) -> Example:
    return Example(row["ctx"], tuple(" " + e for e in row["endings"]), int(row["label"]))


def _arc(row: dict) -> Example:
    labels = list(row["choices"]["label"])
    choices = tuple(" " + t for t in row["choices"]["text"])
    return Example(f"Question: {row['question']}\nAnswer:", choices, labels.index(row["answerKey"]))


def _piqa(row: dict) -> Example:
    return Example(
        f"Question: {row['goal']}\nAnswer:", (" " + row["sol1"], " " + row["sol2"]), int(row["label"])
    )


@dataclass(frozen=True)
class HubTask:
    dataset: str
    subset: str | None
    split: str
    example: Callable[[dict], Example]


HUB_TASKS = {
    "hellaswag": HubTask("Rowan/hellaswag", None, "validation", _hellaswag),
    "arc_easy": HubTask("allenai/ai2_arc", "ARC-Easy", "test", _arc),
    "arc_challenge": HubTask("allenai/ai2_arc", "ARC-Challenge", "test", _arc),
    "piqa": HubTask("ybisk/piqa", None, "validation", _piqa),
}


def shipped_tasks() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.jsonl"))


def task_name(task: str) -> str:
    """How a task is named in metrics: a hub or shipped task's name, a file's stem."""
    return task if task in HUB_TASKS else Path(task).stem


def task_file(task: str) -> Path | None:
    """The JSONL file of a task: a shipped one by name, else a path; None for a hub task. One line saying
    what is allowed when it is neither."""
    if task in HUB_TASKS:
        return None
    if (SHIPPED / f"{task}.jsonl").is_file():
        return SHIPPED / f"{task}.jsonl"
    if task.endswith(".jsonl") and Path(task).expanduser().is_file():
        return Path(task).expanduser()
    raise ConfigError(
        f"eval task {task!r} is not a known task ({', '.join([*HUB_TASKS, *shipped_tasks()])}) nor an "
        "existing .jsonl file of {context, choices, label} rows"
    )


def load_task(task: str, limit: int | None = None) -> list[Example]:
    """The first `limit` examples of a task (all with None), in the task's own order."""
    path = task_file(task)
    if path is None:
        import datasets

        hub = HUB_TASKS[task]
        try:
            rows = datasets.load_dataset(hub.dataset, hub.subset, split=hub.split, streaming=True)
            out = [hub.example(row) for row in itertools.islice(rows, limit)]
        except Exception as e:
            raise ConfigError(
                f"cannot read eval task {task} ({hub.dataset}): {' '.join(str(e).split())[:300]}"
            ) from None
        return out
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(out) >= limit:
                break
            try:
                row = json.loads(line)
                ex = Example(str(row["context"]), tuple(str(c) for c in row["choices"]), int(row["label"]))
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{task} line {n}: not a {{context, choices, label}} row ({e})") from None
            if len(ex.choices) < 2 or not 0 <= ex.label < len(ex.choices):
                raise ConfigError(f"{task} line {n}: needs 2+ choices and a label that indexes them")
            out.append(ex)
    if not out:
        raise ConfigError(f"eval task {task} has no examples")
    return out
