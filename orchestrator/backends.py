"""Where a run's processes live, behind one interface: this machine (LocalBackend: a detached driver in its
own session) or SkyPilot (SkyPilotBackend: a managed job, or a cluster that downs itself). `of(record)`
chooses once, from the run record; the verbs (launch, resume, stop, status, logs, attach, rm) ask the
backend and never which one it is.

What is not here is the same for both: config, checkpoints, metrics and the stop request live in the run's
store (runs.StopRequest), and the driver runs the same code on this machine and on a pod.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Any

from model.errors import ConfigError
from orchestrator import runs


class LocalBackend:
    """`python -m orchestrator.driver` detached on this machine; its log is logs/driver.log."""

    mode = "local"
    rents = False  # --gpu and friends do not apply
    ctrl_c_stops = True  # `--foreground`: Ctrl-C stops the run (a checkpoint first)
    shows_log = True  # `attach` shows the log's tail
    owns_metrics = True  # runs/<name>/metrics.jsonl is the run's own: `lmctl eval` may add to it
    poll_s = 0.2  # how often `stop` looks whether it has ended (a /proc read)
    ends = "killed"  # what cancel() does to it

    def start(self, path: Path) -> runs.RunRecord:
        """Start the driver detached: its own session, so it outlives this command and every process of the
        run can be found (and reaped) by session id. Leftovers of a crashed driver are reaped first."""
        record = runs.read_record(path)
        runs.reap(path, record)
        runs.StopRequest(record.store, record.name).clear()  # an earlier stop is answered
        runs.update_record(
            path,
            launches=record.launches + 1,
            exit_code=None,
            message=None,
            segments=runs.segments_began(record),
        )
        with open(path / runs.LOG, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.driver", str(path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=str(Path(__file__).resolve().parent.parent),
            )
        # One write, so the record never claims an active state without naming a live driver. The driver's
        # own first write (pid, session) says the same; it reaches "running" only seconds later.
        driver = runs.Process.of(proc.pid).__dict__
        return runs.update_record(path, state="staging", driver=driver, session=proc.pid)

    def refresh(self, path: Path) -> runs.RunRecord:
        return runs.read_record(path)  # the driver writes the record itself

    def active(self, path: Path) -> bool:
        return runs.driver_alive(runs.read_record(path))

    def tail_logs(self, path: Path, follow: bool) -> int:
        from orchestrator.observe import print_log

        print_log(path, follow=follow)
        return 0

    def cancel(self, path: Path) -> None:
        record = runs.read_record(path)
        if record.session:
            runs.kill_session(record.session)

    def reap(self, path: Path, state: str = "failed", message: str | None = None) -> list[int]:
        """After the driver is gone (or given up on): what it left in its session is killed, and a record
        still claiming an active state takes `state`. Returns the pids killed."""
        return runs.reap(path, runs.read_record(path), state, message)

    def leftovers(self, record: runs.RunRecord) -> list[int]:
        return runs.session_pids(record.session) if record.session else []

    def facts(self, record: runs.RunRecord) -> dict[str, Any]:
        return {}

    def where(self, record: runs.RunRecord) -> str:
        return f"{record.workers} workers"

    def plan_resume(self, path, record, spec, done, hardware, show_plan, max_cost, confirm):
        return spec  # nothing is rented: nothing to plan or confirm


class SkyPilotBackend:
    """A SkyPilot job (orchestrator/cloud.py makes the SDK calls); the pods reach the store, so metrics and
    the stop request travel through it."""

    mode = "cloud"
    rents = True
    ctrl_c_stops = False  # `--foreground` follows SkyPilot's log; Ctrl-C leaves it, the job goes on
    shows_log = False  # a cloud run's log is SkyPilot's: lmctl logs <run>
    owns_metrics = False  # metrics.jsonl here is a copy of the store's, which the pods write
    poll_s = 5.0  # a SkyPilot call
    ends = "cancelled"

    def start(self, path: Path) -> runs.RunRecord:
        """Pin a hub dataset's revision (its nodes stage it, before training) or stage local files here, put
        config.yaml in the store where the pods read it, and submit the task to SkyPilot with the credentials
        attached as secrets."""
        from model.config import load_spec
        from model.store import StoreError, open_store
        from orchestrator import cloud
        from orchestrator.init_source import upload_folder
        from orchestrator.stage import StageError, pin_revisions, stage_for_run, stages_in_the_cloud

        record = runs.read_record(path)
        try:
            spec = upload_folder(load_spec(path / runs.CONFIG), record.store, record.name)  # --init-from DIR
            on_nodes = stages_in_the_cloud(spec)  # the run's nodes stage it, next to the hub and the bucket
            spec = pin_revisions(spec) if on_nodes else spec
            spec.write(path)
            if not on_nodes:
                with contextlib.redirect_stdout(sys.stderr):  # stdout is for results (--json)
                    spec = stage_for_run(spec, record, path, progress=True)
            open_store(record.store).put_file(path / runs.CONFIG, runs.store_key(record.name, runs.CONFIG))
            runs.StopRequest(record.store, record.name).clear()  # an earlier `lmctl stop` is answered
        except (StoreError, StageError) as e:
            message = f"could not stage {record.name}'s data into {record.store}: {e}"
            runs.update_record(path, state="failed", message=message)
            raise ConfigError(f"{message}; `lmctl resume {record.name}` retries") from None
        record = runs.update_record(
            path,
            state="starting",
            launches=record.launches + 1,
            exit_code=None,
            message=None,
            data=spec.data.path,
        )
        try:
            submitted = cloud.submit(record, path / runs.TASK, cloud.secrets_from_env(record.store))
        except cloud.CloudError as e:
            runs.update_record(path, state="failed", message=str(e))
            raise
        return runs.update_record(
            path, job_id=submitted.job_id, cluster=submitted.cluster, segments=runs.segments_began(record)
        )

    def refresh(self, path: Path) -> runs.RunRecord:
        """An active run's record and metrics brought up to date: metrics.jsonl from the store (the pods write
        it there), the state from SkyPilot. A job that ended cleanly finished only if its last step is
        committed (model.state.outcome); otherwise it was stopped."""
        from model.store import open_store
        from model.timeline import TIMELINE
        from orchestrator import cloud

        record = runs.read_record(path)
        if record.state not in runs.ACTIVE or record.job_id is None:
            return record
        bucket = open_store(record.store)
        for name in (runs.METRICS, TIMELINE, runs.STAGING):  # staging.json: while its head node stages
            key = runs.store_key(record.name, name)
            if bucket.exists(key):
                bucket.get_file(key, path / name)
            elif name == runs.STAGING:
                (path / name).unlink(missing_ok=True)
        info = cloud.job_info(record)
        if info is None:
            return runs.update_record(path, state="failed", message=f"SkyPilot has no job {record.job_id}")
        state = info.state
        if state == "running" and record.state == "stopping":
            state = "stopping"  # asked to stop; the workers have not seen it yet
        elif state == "finished":
            from model.state import outcome

            state, _ = outcome(record.checkpoints, record.steps)
        message = info.message if state == "failed" else record.message
        ended = {} if state in runs.ACTIVE else {"segments": runs.segments_ended(record, info.ended_at)}
        return runs.update_record(
            path, state=state, job_seconds=info.seconds, recoveries=info.recoveries, message=message, **ended
        )

    def active(self, path: Path) -> bool:
        return self.refresh(path).state in runs.ACTIVE

    def tail_logs(self, path: Path, follow: bool) -> int:
        from orchestrator import cloud

        record = runs.read_record(path)
        if record.job_id is None:  # never submitted: what launch printed is all there is
            return LocalBackend().tail_logs(path, follow=False)
        return cloud.tail_logs(record, follow=follow)

    def cancel(self, path: Path) -> None:
        from orchestrator import cloud

        cloud.cancel(runs.read_record(path))

    def reap(self, path: Path, state: str = "failed", message: str | None = None) -> list[int]:
        """After the job ended: a plain cluster's GPUs are freed now rather than at autodown."""
        record = runs.read_record(path)
        if not record.managed and record.cluster and record.state not in runs.ACTIVE:
            self.cancel(path)
        return []

    def leftovers(self, record: runs.RunRecord) -> list[int]:
        return []  # nothing of a cloud run runs on this machine

    def facts(self, record: runs.RunRecord) -> dict[str, Any]:
        """What the run rents (its cost is orchestrator/accounting.py's, in run_summary)."""
        fields = ("gpu", "nodes", "spot", "managed", "job_id", "cluster", "recoveries", "job_seconds")
        return {
            **{k: getattr(record, k) for k in fields},
            "cloud": record.cloud or "any",
            "price_per_hour": record.price_per_hour,
        }

    def where(self, record: runs.RunRecord) -> str:
        return f"{record.gpu} x {record.nodes} node(s), SkyPilot job {record.job_id}"

    def plan_resume(self, path, record, spec, done, hardware, show_plan, max_cost, confirm):
        """The plan for the steps left, shown and held to max_cost and confirm() as at launch; on other
        `hardware` the run is re-rendered for it. Returns the spec to write."""
        from orchestrator import launch

        return launch.replan(path, record, spec, done, hardware, show_plan, max_cost, confirm)


def of(record: runs.RunRecord) -> LocalBackend | SkyPilotBackend:
    """The backend a run was launched on, as its record says."""
    return for_mode(record.mode)


def for_mode(mode: str) -> LocalBackend | SkyPilotBackend:
    backend = {"local": LocalBackend, "cloud": SkyPilotBackend}.get(mode)
    if backend is None:
        raise ConfigError(f"--mode {mode!r}: use one of local, cloud")
    return backend()
