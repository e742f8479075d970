"""The one place lmctl calls SkyPilot's Python SDK: submit a run's task (managed job or plain cluster),
read its state, follow its logs, cancel it. Everything else about a cloud run (metrics, checkpoints, the
stop request) goes through the store, which both this machine and the pods reach; what a run's record
makes of it is backends.SkyPilotBackend's business.

Secrets never touch a file: they are read from this process's environment (and boto3's credential chain
for an s3:// store) and attached to the in-memory sky.Task just before submission, as SkyPilot secrets.
Each SDK call returns a request id; sky.get / sky.stream_and_get wait for it. Tests replace these sky
functions (and nothing else) with fakes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.errors import UserError
from orchestrator import runs

SECRET_NAMES = (
    "WANDB_API_KEY",
    "HF_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)
JOB_FIELDS = ["job_id", "status", "job_duration", "recovery_count", "failure_reason", "end_at"]
AUTODOWN_IDLE_MINUTES = 10  # a --no-managed cluster tears itself down this long after its job ends

# SkyPilot's job states (managed jobs and cluster jobs) -> a run's state.
STATES = {
    "INIT": "starting",
    "PENDING": "starting",
    "SUBMITTED": "starting",
    "STARTING": "starting",
    "SETTING_UP": "starting",
    "RUNNING": "running",
    "WINDING_DOWN": "running",
    "RECOVERING": "recovering",
    "CANCELLING": "stopping",
    "SUCCEEDED": "finished",
    "CANCELLED": "stopped",
}  # anything else (FAILED, FAILED_SETUP, FAILED_DRIVER, FAILED_NO_RESOURCE, ...): failed


class CloudError(UserError):
    """SkyPilot refused or failed a request (no capacity, no credentials, its API server down): not a
    mistake in the config, but one line all the same."""


def secrets_from_env(store: str) -> dict[str, str]:
    """The credentials a pod needs, from this machine: the environment, then boto3's chain (profile,
    ~/.aws) for an s3:// store, since the pods cannot read this machine's ~/.aws."""
    found = {k: os.environ[k] for k in SECRET_NAMES if os.environ.get(k)}
    if store.startswith("s3://") and "AWS_ACCESS_KEY_ID" not in found:
        import boto3

        try:
            creds = boto3.Session().get_credentials()
        except Exception as e:  # noqa: BLE001 - an expired SSO token, a broken profile, ...
            raise CloudError(f"cannot read AWS credentials for {store}: {_first_line(e)}") from None
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            found["AWS_ACCESS_KEY_ID"], found["AWS_SECRET_ACCESS_KEY"] = frozen.access_key, frozen.secret_key
            if frozen.token:
                found["AWS_SESSION_TOKEN"] = frozen.token
    return found


def load_task(task_yaml: Path, secrets: dict[str, str] | None = None) -> Any:
    """The rendered task.yaml as a sky.Task (SkyPilot's own schema; offline), secrets attached in memory."""
    import sky

    try:
        task = sky.Task.from_yaml(str(task_yaml))
    except Exception as e:  # noqa: BLE001 - SkyPilot raises several types for a bad task
        raise CloudError(f"{task_yaml}: SkyPilot rejects the task: {_first_line(e)}") from None
    if secrets:
        task.update_secrets(secrets)
    return task


@dataclass
class Submitted:
    job_id: int | None
    cluster: str | None  # the cluster's name for --no-managed; None for a managed job


def submit(record: runs.RunRecord, task_yaml: Path, secrets: dict[str, str]) -> Submitted:
    """Launch the run's task: a managed job (SkyPilot recovers it from preemptions, re-running setup and
    run on a new pod) or, with managed=False, a cluster that tears itself down when idle."""
    import sky

    if record.managed:
        return Submitted(launch_job(task_yaml, record.name, secrets), None)
    task = load_task(task_yaml, secrets)
    try:
        job_id, _ = sky.stream_and_get(
            sky.launch(
                task, cluster_name=record.name, idle_minutes_to_autostop=AUTODOWN_IDLE_MINUTES, down=True
            )
        )
        return Submitted(job_id, record.name)
    except Exception as e:  # noqa: BLE001 - no credentials, no capacity, API server down, ...
        raise CloudError(f"SkyPilot could not launch {record.name}: {_first_line(e)}") from None


def launch_job(task_yaml: Path, name: str, secrets: dict[str, str]) -> int | None:
    """A managed job of the task: SkyPilot reruns it on new machines after a preemption. Its id."""
    import sky

    task = load_task(task_yaml, secrets)
    try:
        job_ids, _ = sky.stream_and_get(sky.jobs.launch(task, name=name))
    except Exception as e:  # noqa: BLE001 - no credentials, no capacity, API server down, ...
        raise CloudError(f"SkyPilot could not launch {name}: {_first_line(e)}") from None
    return job_ids[0] if job_ids else None


@dataclass
class JobInfo:
    state: str  # a run state (STATES)
    sky_status: str
    seconds: float | None = None  # how long the job has run (SkyPilot's job_duration)
    recoveries: int | None = None
    message: str | None = None
    ended_at: float | None = None  # unix time the job ended (SkyPilot's end_at), once it has


def job_info(record: runs.RunRecord) -> JobInfo | None:
    """The run's job as SkyPilot sees it now; None when SkyPilot has no such job."""
    import sky

    try:
        if record.managed:
            jobs, *_ = sky.get(sky.jobs.queue_v2(refresh=False, job_ids=[record.job_id], fields=JOB_FIELDS))
            job = next((j for j in jobs if _field(j, "job_id") == record.job_id), None)
            if job is None:
                return None
            status = _name(_field(job, "status"))
            return JobInfo(
                STATES.get(status, "failed"),
                status,
                _field(job, "job_duration"),
                _field(job, "recovery_count"),
                _field(job, "failure_reason"),
                _field(job, "end_at") or None,
            )
        statuses = sky.get(sky.job_status(record.cluster, job_ids=[record.job_id]))
    except sky.exceptions.ClusterDoesNotExist:
        # --no-managed: the cluster tore itself down after its job (autodown), or `lmctl stop` took it
        # down; refresh tells finished from stopped by the last committed checkpoint.
        return JobInfo("finished", "CLUSTER_GONE")
    except Exception as e:  # noqa: BLE001
        raise CloudError(f"SkyPilot could not report on {record.name}: {_first_line(e)}") from None
    status = statuses.get(record.job_id)
    if status is None:
        return None
    return JobInfo(STATES.get(_name(status), "failed"), _name(status))


def tail_logs(record: runs.RunRecord, follow: bool) -> int:
    """Print the job's output (the driver's and every worker's) to stdout; with follow, until it ends.
    Returns SkyPilot's exit code for it (0 when the job succeeded)."""
    import sky

    try:
        if record.managed:
            code = sky.jobs.tail_logs(job_id=record.job_id, follow=follow)
        else:
            code = sky.tail_logs(record.cluster, record.job_id, follow=follow)
        return int(code or 0)
    except Exception as e:  # noqa: BLE001
        raise CloudError(f"SkyPilot could not read the logs of {record.name}: {_first_line(e)}") from None


def cancel(record: runs.RunRecord) -> None:
    """End the job now (no checkpoint: `lmctl stop` asks the workers first) and free its GPUs."""
    import sky

    try:
        if record.managed:
            sky.get(sky.jobs.cancel(job_ids=[record.job_id]))
        else:
            sky.get(sky.down(record.cluster))
    except sky.exceptions.ClusterDoesNotExist:
        pass  # already down (autodown): nothing left to free
    except Exception as e:  # noqa: BLE001
        raise CloudError(f"SkyPilot could not cancel {record.name}: {_first_line(e)}") from None


def _field(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def _name(status: Any) -> str:
    return str(getattr(status, "value", status))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
