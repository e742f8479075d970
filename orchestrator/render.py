"""Render SkyPilot task YAMLs: a run's from tasks/train.yaml (its config.yaml is RunSpec.write's), and a
cloud staging's from tasks/stage.yaml.

Values are substituted as JSON strings (valid YAML scalars), so a name or URI can never break the YAML
or smuggle in keys. Nothing secret is ever rendered: credentials reach pods as SkyPilot secrets, attached
to the task object at launch (orchestrator/cloud.py).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"
PROJECT_ROOT = TASKS_DIR.parent
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")  # {{name}}: shell's $VAR and ${VAR} in scripts stay as they are

# Where the store is, not who may read it: safe to render, and the pods need them to find the bucket.
PLAIN_ENVS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "HF_ENDPOINT")


def render_task(
    name: str,
    store: str,
    workers: int,
    resources: dict[str, Any] | None = None,
    num_nodes: int = 1,
    template: Path = TASKS_DIR / "train.yaml",
) -> str:
    """The SkyPilot task YAML of a run. Without `resources` (a local run) it asks for a CPU machine with
    `workers` CPU workers; with them (gpus.sky_resources) one worker per GPU on every node."""
    resources = resources or {"cpus": f"{max(2, workers)}+", "disk_size": 64}
    workers_per_node = json.dumps(str(max(1, workers // max(1, num_nodes))))
    return fill(template, name, store, resources, num_nodes, cpu_workers_per_node=workers_per_node)


def render_stage_task(name: str, store: str, stage: dict[str, Any], cpus: int, num_nodes: int) -> str:
    """The SkyPilot task YAML of `lmctl stage --cloud`: `num_nodes` CPU machines of at least `cpus` CPUs."""
    resources = {"cpus": f"{cpus}+", "disk_size": 256}  # a unit's shards wait on local disk for upload
    return fill(
        TASKS_DIR / "stage.yaml", name, store, resources, num_nodes, stage=json.dumps(json.dumps(stage))
    )


def fill(
    template: Path, name: str, store: str, resources: dict[str, Any], num_nodes: int, **more: str
) -> str:
    """A task template with every {{...}} filled: the values every task has, the plain envs of this machine
    (where the store and the hub are), and `more` (already YAML scalars)."""
    block = yaml.safe_dump(resources, sort_keys=False).rstrip("\n")
    extra = {k: os.environ[k] for k in PLAIN_ENVS if os.environ.get(k)}
    values = {
        "name": json.dumps(name),
        "num_nodes": str(int(num_nodes)),
        "resources": _indent(block),
        "workdir": json.dumps(str(PROJECT_ROOT)),
        "store": json.dumps(store),
        "extra_envs": "\n".join(f"  {k}: {json.dumps(v)}" for k, v in extra.items()),
        **more,
    }
    text = PLACEHOLDER.sub(lambda m: values[m[1]], template.read_text())  # KeyError: a template typo
    yaml.safe_load(text)  # a template edit that breaks YAML fails here, not on the pod
    return text


def _indent(block: str) -> str:
    return "\n".join(f"  {line}" for line in block.splitlines())
