"""Profile N training steps: a torch profiler trace, a CUDA memory snapshot, NVTX ranges, a summary table.

    lmctl train --config 1b --run-dir runs/prof --profile 5     # or python -m model.train, the same flags

Files under <run-dir>/profile/:
  trace.json              the profiled steps, kernels included on a GPU: open in https://ui.perfetto.dev
                          or chrome://tracing
  memory_snapshot.pickle  (CUDA) every allocation of the run up to the last profiled step, with stacks:
                          drag into https://pytorch.org/memory_viz
  summary.txt             the top ops by self time, device and host
The step's phases (forward, backward, optimizer) are named ranges in the trace, and NVTX ranges on a GPU,
so `nsys profile python -m model.train ... --profile 5` shows them too.

Why these: the trace answers "where does a step's time go", the memory snapshot "what fills the GPU at the
peak" (what model/memory.py predicts), and both open in the viewers people already use.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

WAIT_STEPS = 1  # the first step compiles and allocates: left out of the trace
WARMUP_STEPS = 1


@contextlib.contextmanager
def phase(name: str):
    """A named range: in the profiler's trace always, and as NVTX on a GPU (for Nsight Systems)."""
    nvtx = torch.cuda.is_available() and torch.cuda.is_initialized()
    if nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()


class StepProfiler:
    """Profiles `steps` optimizer steps after WAIT_STEPS + WARMUP_STEPS; call step() after each one."""

    def __init__(self, out_dir: Path, steps: int, device: torch.device):
        self.out, self.steps, self.cuda = Path(out_dir), steps, device.type == "cuda"
        self.out.mkdir(parents=True, exist_ok=True)
        self.left = self.total(steps)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self.prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=WAIT_STEPS, warmup=WARMUP_STEPS, active=steps, repeat=1),
            on_trace_ready=self._write,
            record_shapes=True,
            profile_memory=True,
        )
        self.prof.start()

    @staticmethod
    def total(steps: int) -> int:
        """Steps from the start to the end of a profile of `steps` steps."""
        return WAIT_STEPS + WARMUP_STEPS + steps

    def step(self) -> None:
        """Advance the schedule; after the last profiled step, write everything and stop profiling."""
        if self.left <= 0:
            return
        self.prof.step()
        self.left -= 1
        if self.left == 0:
            self.prof.stop()
            if self.cuda:
                torch.cuda.memory._dump_snapshot(str(self.out / "memory_snapshot.pickle"))
                torch.cuda.memory._record_memory_history(enabled=None)
            print(f"profile of {self.steps} steps written to {self.out}", flush=True)

    def _write(self, prof) -> None:
        prof.export_chrome_trace(str(self.out / "trace.json"))
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        (self.out / "summary.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=30) + "\n")
