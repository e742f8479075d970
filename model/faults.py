"""Fault injection: signal this process at a named point, to prove crash safety in tests.

`LMCTL_FAULT="checkpoint.after_file:2"` kills the process the 2nd time `fault_point("checkpoint.after_file")`
runs; several points may be given, comma-separated ("a:1,b:3"). SIGKILL, not an exception, because
a real crash (OOM killer, preemption) runs no `finally` blocks and flushes nothing. "train.step:3:TERM"
sends SIGTERM instead: a polite stop, as `lmctl stop` or a scheduler sends. "checkpoint.after_file:1:SESSION"
SIGKILLs every process of this process's session at once (a detached run's driver, Ray and all workers):
a machine losing power at exactly that instant.
With the variable unset a fault point is one dict lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "LMCTL_FAULT"
_hits: Counter[str] = Counter()


SESSION = "SESSION"


def _parse(spec: str) -> dict[str, tuple[int, str]]:
    """'a:2,b,c:1:TERM' -> {'a': (2, 'KILL'), 'b': (1, 'KILL'), 'c': (1, 'TERM')}."""
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, n, action = ([*item.split(":"), "", ""])[:3]
        action = action.strip() or "KILL"
        if action != SESSION:
            signal.Signals[f"SIG{action}"]  # a typo fails loudly here, not silently at the fault point
        out[name.strip()] = (int(n) if n.strip() else 1, action)
    return out


def kill_session() -> None:
    """SIGKILL every other process of this session, then this one."""
    sid, me = os.getsid(0), os.getpid()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != me:
            try:
                if os.getsid(int(entry.name)) == sid:
                    os.kill(int(entry.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    os.kill(me, signal.SIGKILL)


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
        if target[1] == SESSION:
            kill_session()
        os.kill(os.getpid(), signal.Signals[f"SIG{target[1]}"])


def reset() -> None:
    """Forget hit counts (tests that run several scenarios in one process)."""
    _hits.clear()
