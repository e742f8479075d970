"""A fake of the SkyPilot SDK calls orchestrator/cloud.py makes, for tests without an API server.

`install(monkeypatch)` replaces exactly these with recorders: sky.jobs.launch, sky.jobs.queue_v2,
sky.jobs.cancel, sky.jobs.tail_logs, sky.launch, sky.job_status, sky.tail_logs, sky.down, sky.get and
sky.stream_and_get. Each recorder first binds its arguments to the real function's signature (a keyword
SkyPilot does not have fails the test), then answers like the SDK does: a request id, which sky.get /
sky.stream_and_get turn into the result (or raise the scripted error). The job states are SkyPilot's
own enums and the queue rows its own ManagedJobRecord, decoded as the client would decode them.

Everything else in SkyPilot stays real; with SKYPILOT_DISABLE_LOCAL_API_SERVER=1 any call not faked here
fails at once instead of starting a server.
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass, field
from typing import Any

import sky
import sky.exceptions
import sky.jobs
from sky.jobs.state import ManagedJobStatus
from sky.schemas.api.responses import ManagedJobRecord
from sky.skylet.job_lib import JobStatus

# what is faked -> (module, attribute, FakeSky method)
FAKED = {
    "jobs.launch": (sky.jobs, "launch", "jobs_launch"),
    "jobs.queue_v2": (sky.jobs, "queue_v2", "jobs_queue"),
    "jobs.cancel": (sky.jobs, "cancel", "jobs_cancel"),
    "jobs.tail_logs": (sky.jobs, "tail_logs", "jobs_tail_logs"),
    "launch": (sky, "launch", "launch"),
    "job_status": (sky, "job_status", "job_status"),
    "tail_logs": (sky, "tail_logs", "tail_logs"),
    "down": (sky, "down", "down"),
    "get": (sky, "get", "get"),
    "stream_and_get": (sky, "stream_and_get", "stream_and_get"),
}
REAL = {fn: getattr(module, attr) for fn, (module, attr, _) in FAKED.items()}  # for their signatures


@dataclass
class Call:
    fn: str  # "jobs.launch", "down", ...: the key of FAKED
    args: dict[str, Any]  # every parameter of the real function, defaults applied


@dataclass
class FakeSky:
    calls: list[Call] = field(default_factory=list)
    # Successive answers of the status calls (jobs.queue_v2 or job_status): each call takes the next, the last
    # one repeats. ManagedJobStatus for managed jobs, JobStatus for clusters.
    statuses: list[Any] = field(default_factory=lambda: [ManagedJobStatus.PENDING])
    job_duration: float | None = None
    recovery_count: int | None = 0
    failure_reason: str | None = None
    launch_error: BaseException | None = None  # raised by stream_and_get of a launch, as a failed request
    unreachable: BaseException | None = None  # raised by every call, as when no API server answers
    status_polls: int = 0
    jobs: set[int] = field(default_factory=set)  # job ids launched so far
    # clusters up: sky.launch brings one up, sky.down ends it; afterwards SkyPilot says it does not exist
    clusters: set[str] = field(default_factory=set)
    pending: dict[str, tuple[str, Any]] = field(default_factory=dict)  # request id -> (fn, result)
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    _job_ids: Any = field(default_factory=lambda: itertools.count(41))

    def script(self, *statuses: Any, **fields: Any) -> None:
        """What the next status calls answer, in order (the last repeats); job_duration etc. as keywords."""
        assert statuses and all(isinstance(x, (ManagedJobStatus, JobStatus)) for x in statuses), statuses
        self.statuses, self.status_polls = list(statuses), 0
        for k, v in fields.items():
            setattr(self, k, v)

    def called(self, fn: str) -> list[dict[str, Any]]:
        """The bound arguments of every call of `fn`, in order."""
        return [c.args for c in self.calls if c.fn == fn]

    def count(self, fn: str) -> int:
        return len(self.called(fn))

    # ------------------------------------------------------------ the fakes

    def _record(self, fn: str, args: tuple, kwargs: dict) -> dict[str, Any]:
        bound = inspect.signature(REAL[fn]).bind(*args, **kwargs)
        bound.apply_defaults()
        self.calls.append(Call(fn, dict(bound.arguments)))
        if self.unreachable is not None:
            raise self.unreachable
        return dict(bound.arguments)

    def _request(self, fn: str, result: Any) -> str:
        rid = f"req-{next(self._ids)}-{fn}"
        self.pending[rid] = (fn, result)
        return rid

    def _status(self) -> Any:
        status = self.statuses[min(self.status_polls, len(self.statuses) - 1)]
        self.status_polls += 1
        return status

    def jobs_launch(self, *args, **kwargs):
        self._record("jobs.launch", args, kwargs)
        job_id = next(self._job_ids)
        self.jobs.add(job_id)
        return self._request("jobs.launch", self.launch_error or ([job_id], None))

    def jobs_queue(self, *args, **kwargs):
        a = self._record("jobs.queue_v2", args, kwargs)
        status = ManagedJobStatus(self._status().value)  # a managed job's states are ManagedJobStatus
        rows = [
            ManagedJobRecord(
                job_id=j,
                task_id=0,
                job_name="fake",
                status=status,
                job_duration=self.job_duration,
                recovery_count=self.recovery_count,
                failure_reason=self.failure_reason,
            )
            for j in sorted(self.jobs)
            if a["job_ids"] is None or j in a["job_ids"]
        ]
        return self._request("jobs.queue_v2", (rows, len(rows), {}, len(rows)))  # jobs, totals, counts

    def jobs_cancel(self, *args, **kwargs):
        self._record("jobs.cancel", args, kwargs)
        return self._request("jobs.cancel", None)

    def jobs_tail_logs(self, *args, **kwargs):
        self._record("jobs.tail_logs", args, kwargs)
        return 0  # the job's exit code; no request id (the SDK streams the logs itself)

    def launch(self, *args, **kwargs):
        a = self._record("launch", args, kwargs)
        job_id = next(self._job_ids)
        self.jobs.add(job_id)
        if self.launch_error is None:
            self.clusters.add(a["cluster_name"])
        return self._request("launch", self.launch_error or (job_id, None))

    @staticmethod
    def _gone(cluster: str) -> BaseException:
        return sky.exceptions.ClusterDoesNotExist(f"Cluster {cluster!r} does not exist.")

    def job_status(self, *args, **kwargs):
        a = self._record("job_status", args, kwargs)
        if a["cluster_name"] not in self.clusters:  # what the API server answers once it is down
            return self._request("job_status", self._gone(a["cluster_name"]))
        status = JobStatus(self._status().value)  # a cluster job's states are JobStatus
        ids = a["job_ids"] or sorted(self.jobs)
        return self._request("job_status", {j: (status if j in self.jobs else None) for j in ids})

    def tail_logs(self, *args, **kwargs):
        a = self._record("tail_logs", args, kwargs)
        if a["cluster_name"] not in self.clusters:
            raise self._gone(a["cluster_name"])
        return 0

    def down(self, *args, **kwargs):
        a = self._record("down", args, kwargs)
        if a["cluster_name"] not in self.clusters:
            return self._request("down", self._gone(a["cluster_name"]))
        self.clusters.discard(a["cluster_name"])
        return self._request("down", None)

    def _wait(self, fn: str, args: tuple, kwargs: dict) -> Any:
        request_id = self._record(fn, args, kwargs)["request_id"]
        assert request_id in self.pending, f"sky.{fn}({request_id!r}): not a request id this fake issued"
        _, result = self.pending.pop(request_id)
        if isinstance(result, BaseException):
            raise result
        return result

    def get(self, *args, **kwargs):
        return self._wait("get", args, kwargs)

    def stream_and_get(self, *args, **kwargs):
        return self._wait("stream_and_get", args, kwargs)


def install(monkeypatch) -> FakeSky:
    """Replace the SDK calls with a fresh FakeSky's; monkeypatch puts the real ones back."""
    monkeypatch.setenv("SKYPILOT_DISABLE_LOCAL_API_SERVER", "1")
    fake = FakeSky()
    for module, attr, method in FAKED.values():
        monkeypatch.setattr(module, attr, getattr(fake, method))
    return fake


__all__ = ["FakeSky", "JobStatus", "ManagedJobStatus", "install"]
