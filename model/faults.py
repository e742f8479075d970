"""Fault injection: signal this process at a named point, to prove crash safety in tests.

`LMCTL_FAULT="checkpoint.after_file:2"` kills the process the 2nd time `fault_point("checkpoint.after_file")`
runs; several points may be given, comma-separated ("a:1,b:3"). SIGKILL, not an exception, because
a real crash (OOM killer, preemption) runs no `finally` blocks and flushes nothing. "train.step:3:TERM"
sends SIGTERM instead: a polite stop, as `lmctl stop` or a scheduler sends.
With the variable unset a fault point is one dict lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "LMCTL_FAULT"
_hits: Counter[str] = Counter()


def _parse(spec: str) -> dict[str, tuple[int, signal.Signals]]:
    """'a:2,b,c:1:TERM' -> {'a': (2, SIGKILL), 'b': (1, SIGKILL), 'c': (1, SIGTERM)}."""
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, n, sig = ([*item.split(":"), "", ""])[:3]
        out[name.strip()] = (int(n) if n.strip() else 1, signal.Signals[f"SIG{sig.strip() or 'KILL'}"])
    return out


def fault_point(name: str) -> None:
    """Count a hit of `name`; signal this process at the hit that LMCTL_FAULT names."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target = _parse(spec).get(name)
    if target is None:
        return
    _hits[name] += 1
    if _hits[name] == target[0]:
        os.kill(os.getpid(), target[1])


def reset() -> None:
    """Forget hit counts (tests that run several scenarios in one process)."""
    _hits.clear()
