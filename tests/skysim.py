"""A simulated SkyPilot cluster on this machine: runs a sky.Task's own `setup` and `run` scripts the way
SkyPilot runs them on each node of a job, with the SKYPILOT_* variables set.

Each node is a process session with its own home for lmctl (runs folder, data cache), so a "new pod"
after a preemption starts with nothing but the task's envs and secrets, as on a cloud. Node IPs are all
loopback and nodes have no GPU (SKYPILOT_NUM_GPUS_PER_NODE=0: CPU Ray Train workers). A preemption is a
SIGKILL of every process of every node.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from orchestrator import runs


def free_ports(n: int) -> list[int]:
    """n free TCP ports that are not in Ray's worker-port range (10002-19999)."""
    found: list[int] = []
    while len(found) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 20000 and port + 1 not in found and port not in found:
            found.append(port)
    return found


class SimCluster:
    def __init__(self, task: Any, base: Path, env: dict[str, str], gpus_per_node: int = 0):
        self.task, self.base, self.env = task, base, env
        self.gpus_per_node = gpus_per_node  # what SkyPilot says the pods have; this machine has none
        self.nodes = task.num_nodes
        self.procs: list[subprocess.Popen] = []
        self.launches = 0
        self.node_extra: dict[
            int, dict[str, str]
        ] = {}  # one node's own extra env (a fault), for the next start
        # SkyPilot's recovery keeps the task's envs; our ports are the sim's, since other Ray instances of
        # the test session may use the defaults.
        ray_port, client_port, agent_port = free_ports(3)
        self.ports = {
            "LMCTL_RAY_PORT": str(ray_port),
            "LMCTL_RAY_CLIENT_PORT": str(client_port),
            "LMCTL_RAY_AGENT_PORT": str(agent_port),
        }

    def node_env(self, rank: int) -> dict[str, str]:
        home = self.base / f"launch{self.launches}-node{rank}"  # a new pod per launch: nothing carried over
        env = dict(self.env)
        env.update({k: str(v) for k, v in self.task.envs.items()})
        env.update({k: v.get_secret_value() for k, v in self.task.secrets.items()})
        env.update(self.ports)
        env.update(
            SKYPILOT_NODE_RANK=str(rank),
            SKYPILOT_NODE_IPS="\n".join(["127.0.0.1"] * self.nodes),
            SKYPILOT_NUM_NODES=str(self.nodes),
            SKYPILOT_NUM_GPUS_PER_NODE=str(self.gpus_per_node),
            SKYPILOT_TASK_ID=f"sky-sim-{self.task.name}",  # stable across recoveries, as on SkyPilot
            LMCTL_RUNS_DIR=str(home / "runs"),
            LMCTL_CACHE=str(home / "cache"),
        )
        env.update(self.node_extra.get(rank, {}))
        return env

    def setup(self, timeout: float = 600) -> subprocess.CompletedProcess:
        """The task's setup, once: the simulated nodes share this machine's disk (and its .venv)."""
        return subprocess.run(
            ["bash", "-c", self.task.setup],
            cwd=self.task.workdir,
            env=self.node_env(0),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self) -> None:
        """The task's run on every node at once, each in its own session (what SkyPilot does per node)."""
        self.launches += 1
        self.procs = []
        for rank in range(self.nodes):
            log = (self.base / f"launch{self.launches}-node{rank}.log").open("wb")
            self.procs.append(
                subprocess.Popen(
                    ["bash", "-c", self.task.run],
                    cwd=self.task.workdir,
                    env=self.node_env(rank),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def log(self, rank: int = 0) -> str:
        return (self.base / f"launch{self.launches}-node{rank}.log").read_text(errors="replace")

    def wait_head(self, timeout: float) -> int:
        """The job's exit code: the head's (workers' run scripts exit once their Ray node has joined)."""
        return self.procs[0].wait(timeout=timeout)

    def preempt(self) -> None:
        """Every process of every node SIGKILLed at once, Ray's daemons included: the pods are gone."""
        self.kill(signal.SIGKILL)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        for proc in self.procs:
            runs.kill_session(proc.pid, sig)
            proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(runs.session_pids(p.pid) for p in self.procs) and time.monotonic() < deadline:
            for proc in self.procs:
                runs.kill_session(proc.pid, signal.SIGKILL)
            time.sleep(0.1)


def wait_until(condition, timeout: float, what: str, poll_s: float = 0.2, alive=None) -> None:
    """Poll `condition` until true; fail after `timeout` or as soon as alive() says the job ended."""
    deadline = time.monotonic() + timeout
    while not condition():
        if alive is not None and not alive():
            raise AssertionError(f"the job ended before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll_s)


def bare_env(env: dict[str, str]) -> dict[str, str]:
    """A pod's starting environment: this one without lmctl's, Ray's, SkyPilot's and wandb's variables
    and without AWS credentials or endpoint, which a pod gets only from the task (envs and secrets)."""
    drop = (
        "LMCTL_",
        "RAY_",
        "WANDB_",
        "SKYPILOT_",
        "AWS_ACCESS_KEY",
        "AWS_SECRET",
        "AWS_SESSION",
        "AWS_ENDPOINT",
    )
    return {k: v for k, v in env.items() if not k.startswith(drop)} | {"WANDB_MODE": "offline"}
