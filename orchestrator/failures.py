"""Which training failures Ray Train retries: those that may go away, not those that come back every time.

Ray's default policy (`FailureConfig(max_failures=N)`) restarts the worker group after any worker error.
That is right for a killed worker, a lost node or a store that hiccupped, and wrong for an error that a
retry only repeats (model.errors.PermanentError: a config value, data that does not fit the model): such a
run failed N + 1 times, its cause N + 1 times in the log, and `WorkerGroupError: Training failed due to
worker errors:` as its message. Here it fails at once, and its message is the cause's one line.

Ray 2.60 has no public setting for the failure policy: the trainer builds Ray's default one and hands it to
its controller actor through `_initialize_and_run_controller`, where `trainer()` puts ours instead. The
controller unpickles the policy, so this module is imported in that actor too: it imports little.
"""

from __future__ import annotations

from typing import Any

from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision

from model.errors import PermanentError


def worker_errors(error: BaseException) -> list[BaseException]:
    """The exceptions the workers raised, by rank (Ray's WorkerGroupError keeps the originals)."""
    failures = getattr(error, "worker_failures", None) or {}
    return [failures[rank] for rank in sorted(failures)]


def permanent_cause(error: BaseException) -> BaseException | None:
    """The worker error that every retry would raise again, if there is one."""
    return next((e for e in worker_errors(error) if isinstance(e, PermanentError)), None)


def failure_message(error: BaseException) -> str:
    """The run's message, one line: a permanent cause as it was phrased for the user, otherwise the first
    worker's (or Ray's controller's) error with its type."""
    cause = permanent_cause(error)
    if cause is None:
        inner = (worker_errors(error) or [getattr(error, "controller_failure", None) or error])[0]
        cause = f"{type(inner).__name__}: {inner}"
    return next((line.strip() for line in str(cause).splitlines() if line.strip()), type(error).__name__)


class RetryTransientOnly(DefaultFailurePolicy):
    """Ray's default policy (up to max_failures restarts), except that a permanent error is raised at once."""

    def make_decision(self, training_failed_error: Any) -> FailureDecision:
        if permanent_cause(training_failed_error) is not None:
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


def trainer(**kwargs: Any) -> Any:
    """A TorchTrainer(**kwargs) whose controller retries transient failures only (RetryTransientOnly)."""
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        def _initialize_and_run_controller(self, **controller_kwargs: Any) -> Any:
            controller_kwargs["failure_policy"] = RetryTransientOnly(self.run_config.failure_config)
            return super()._initialize_and_run_controller(**controller_kwargs)

    return Trainer(**kwargs)
