"""The one place where failures are classified.

Every boundary (generator, store, ledger) turns library exceptions into one of these, so the
task layer decides "retry or give up" from the type alone. ``reason`` is a sentence for a
person; it is what events carry, so it never holds a stack trace, a URL with a token, or a key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.generation import Bill


class RefgenError(Exception):
    """Base of every error this worker raises on purpose.

    ``billed`` is what the provider charged for the attempt that failed: Replicate bills the
    run time of failed and cancelled predictions too (an aborted one costs 0). None when no
    paid call ran."""

    reason: str
    billed: Bill | None = None

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RetryableError(RefgenError):
    """Transient: rate limit, 5xx, timeout, network. Worth another attempt."""

    def __init__(self, reason: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class RateLimitedError(RetryableError):
    """HTTP 429 from a provider."""


class ImageTimeoutError(RetryableError):
    """An image took longer than its deadline."""


class PermanentError(RefgenError):
    """Another attempt would fail the same way: invalid input, content rejected, budget."""


class InvalidPlanError(PermanentError):
    """The scene plan breaks the input contract (SPEC §2)."""

    def __init__(self, reason: str, *, details: list[str] | None = None) -> None:
        super().__init__(reason)
        self.details = details or []


class ContentRejectedError(PermanentError):
    """The provider's safety filter refused the prompt or the output."""


class CancelledError(PermanentError):
    """The provider's work for this image was cancelled (by us, for a job that can no longer
    pass, or on the provider's side)."""


class BudgetExceededError(PermanentError):
    """A paid call would take the job over its budget."""

    def __init__(self, reason: str, *, limit: str | None, spent: str, requested: str) -> None:
        super().__init__(reason)
        self.limit = limit
        self.spent = spent
        self.requested = requested


class StoreRefusedError(PermanentError):
    """The store refuses us for every image (its key refused, its bucket missing): paying for
    another image that could not be kept would be waste, so the store is checked again before
    the next paid call."""


class BucketMissingError(StoreRefusedError):
    """The bucket does not exist (never created, or deleted while workers run)."""


class DeliveryAbandoned(Exception):
    """This delivery cannot finish (Redis unreachable, or another delivery took over its image):
    it stops without a result and keeps its task's lease, which brings the task back."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigurationError(PermanentError):
    """Settings that cannot work: missing credentials in production, placeholder secrets."""


class InstallationError(ConfigurationError):
    """The installed package lacks a file it reads at run time (a Lua script, a page): a
    packaging fault that no retry or setting mends, found when the process starts."""

    def __init__(self, path: str, cause: OSError) -> None:
        why = "is missing" if isinstance(cause, FileNotFoundError) else "cannot be read"
        super().__init__(
            f"the installed refgen package is incomplete: {path} {why}; reinstall it from a "
            "wheel or image built from a clean checkout"
        )
        self.path = path


class JobStartFailed(RefgenError):
    """A job's ``start`` failed on the worker with an error that is not a refusal (a fault):
    stored under that ``start``'s task id, never the job id, for its sender to report."""
