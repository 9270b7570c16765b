"""Calls to the Hub through huggingface_hub's public API, with the retries it lacks.

Files come through `snapshot_download(local_dir=..., allow_patterns=...)`: eight at a
time, each written whole through a temporary file of its own or not at all. What
huggingface_hub 2.4 retries by itself (pinned in tests/test_hubserver.py):

* the HEAD before each file: on 408/429/5xx, timeouts and refused connections, one
  plain attempt then up to 5 retries (1, 2, 4, 8, 8 s; ``Retry-After`` + 1 s on 429),
  then `LocalEntryNotFoundError` - but no retry at all under ``force_download=True``;
* the GET of the body: 408/429 up to 5 retries as above; a refused connection, a
  timeout or a body cut short (FIN) up to 5 times, 1 s apart;
* nothing else: not `HfApi.model_info`, not a 5xx on the GET, not a TCP reset.

So this module retries (bounded by ``max_retries``, exponential backoff from
``backoff_base`` with jitter, ``Retry-After`` honoured up to a cap) `model_info`, a 5xx
or a reset during the GET, network errors that outlast huggingface_hub's 1-second
attempts, HEAD errors under ``force_download``, and a body whose size or hash is
wrong. It does not retry again what huggingface_hub already retried with backoff: a
failed HEAD, and a 408/429 on the GET.

401/403, 404 and a full disk are never retried; they become one-line
`ModelDownloadError`s that say what to do.
"""

from __future__ import annotations

import errno
import glob
import logging
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TypeVar

from ..errors import CacheError, MlxnodeError, ModelDownloadError
from ..formatting import format_bytes
from ..logs import redact

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Longest wait between two attempts, whatever the backoff or the server asks for.
MAX_BACKOFF = 60.0
RETRY_AFTER_CAP = 60.0
AUTH_HINT = (
    "set HF_TOKEN or run `hf auth login` (`huggingface-cli login`) with an account that has access"
)
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class TransientError(Exception):
    """A failure worth another attempt that huggingface_hub did not raise (bad size or hash)."""


@dataclass(frozen=True)
class Failure:
    """How one exception should be handled."""

    transient: bool
    retried_by_hub: bool
    reason: str
    status: int | None = None
    retry_after: float | None = None


def with_retries(
    call: Callable[[], T],
    *,
    what: str,
    max_retries: int,
    backoff_base: float,
    describe: Callable[[BaseException, Failure, int], MlxnodeError],
    download: bool = False,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `call`, retrying transient failures; raise `describe(...)`'s error otherwise.

    Args:
        call: One attempt.
        what: For log lines, e.g. ``"model-00001-of-00004.safetensors"``.
        max_retries: Further attempts after the first.
        backoff_base: Seconds before the first retry; doubles each time, with jitter.
        describe: Builds the error to raise from (exception, failure, attempts made).
        download: `call` runs `download`, whose own retries `classify` accounts for.
    """
    attempt = 0
    while True:
        try:
            return call()
        except MlxnodeError:
            raise
        except Exception as e:  # noqa: BLE001 - classified below, re-raised if unknown
            failure = classify(e, download=download)
            if failure is None:
                raise
            attempt += 1
            if not failure.transient or failure.retried_by_hub or attempt > max_retries:
                raise describe(e, failure, attempt) from e
            delay = backoff_delay(attempt, backoff_base, failure.retry_after)
            logger.warning(
                "%s: %s; retry %d/%d in %.2fs", what, failure.reason, attempt, max_retries, delay
            )
            sleep(delay)


def backoff_delay(attempt: int, base: float, retry_after: float | None) -> float:
    """``base * 2**(attempt-1)`` with +-25% jitter, at least `retry_after`, at most the cap."""
    delay = base * (2 ** (attempt - 1)) * random.uniform(0.75, 1.25)
    if retry_after is not None:
        delay = max(delay, min(retry_after, RETRY_AFTER_CAP))
    return min(delay, MAX_BACKOFF)


def classify(error: BaseException, *, download: bool = False) -> Failure | None:
    """What kind of failure `error` is, or None if it is not a download failure at all.

    With `download`, `error` came out of `download`: a 408/429 there was already retried
    by huggingface_hub with backoff and ``Retry-After``, so it is not retried again.
    """
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    if isinstance(error, TransientError):
        return Failure(True, False, str(error))
    if isinstance(error, OfflineModeIsEnabled):
        return Failure(False, False, "offline mode is on")
    if isinstance(error, LocalEntryNotFoundError):
        # Raised after the HEAD failed; huggingface_hub retried it first if it was transient.
        cause = error.__cause__
        inner = classify(cause, download=download) if cause is not None else None
        if inner is None:
            return Failure(False, False, _first_line(error))
        return Failure(inner.transient, True, inner.reason, inner.status, inner.retry_after)
    if isinstance(error, ValueError) and isinstance(error.__cause__, Exception):
        # `force_download=True` turns a failed HEAD into ValueError, without retrying it.
        inner = classify(error.__cause__, download=download)
        if inner is not None:
            return Failure(inner.transient, False, inner.reason, inner.status, inner.retry_after)
        return None
    if isinstance(error, HfHubHTTPError):
        response = getattr(error, "response", None)
        status = getattr(response, "status_code", None)
        retry_after = _retry_after(response)
        transient = status in _RETRY_STATUSES
        retried = download and status in (408, 429)
        return Failure(transient, retried, f"HTTP {status}", status, retry_after)
    if isinstance(error, _network_errors()):
        detail = _first_line(error) or "no detail"
        return Failure(True, False, f"{type(error).__name__}: {detail}")
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return Failure(False, False, "no space left on device")
    if download and type(error) is OSError and error.errno is None:
        # Not the file system (that sets errno): huggingface_hub's size check of a body.
        return Failure(True, False, _first_line(error) or "download failed")
    return None


def describe_error(
    error: BaseException,
    failure: Failure,
    attempts: int,
    *,
    repo_id: str,
    revision: str,
    endpoint: str,
    filename: str | None = None,
    disk: tuple[Path, int] | None = None,
) -> MlxnodeError:
    """The one-line error for a download that cannot succeed; never includes a token."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    root = _root_cause(error)
    status = failure.status
    what = f"{filename} of {repo_id}" if filename else repo_id

    def fail(message: str) -> ModelDownloadError:
        return ModelDownloadError(
            redact(message), repo_id=repo_id, filename=filename, status=status
        )

    if isinstance(root, OfflineModeIsEnabled):
        return CacheError(
            f"{what} is not in the cache and HF_HUB_OFFLINE is set; run `mlxnode cache prewarm "
            f"{repo_id}` while online"
        )
    if isinstance(root, GatedRepoError) or status in (401, 403):
        kind = "gated or private" if isinstance(root, GatedRepoError) else "access denied"
        return fail(
            f"{repo_id} at {endpoint}: HTTP {status}, {kind}; {AUTH_HINT} "
            "(and accept the model's terms on its Hub page if it is gated)"
        )
    if isinstance(root, RevisionNotFoundError):
        return fail(f"revision {revision!r} not found in {repo_id} at {endpoint} (HTTP {status})")
    if isinstance(root, RepositoryNotFoundError):
        return fail(
            f"repository {repo_id} not found at {endpoint} (HTTP {status}); check the name, "
            f"and if it is private {AUTH_HINT}"
        )
    if isinstance(root, RemoteEntryNotFoundError) or (
        isinstance(root, HfHubHTTPError) and status == 404
    ):
        target = f"file {filename!r}" if filename else "a file"
        return fail(
            f"{target} not found in {repo_id} at revision {revision!r} on {endpoint} (HTTP 404)"
        )
    if isinstance(root, OSError) and root.errno == errno.ENOSPC:
        where, needed = disk if disk is not None else (Path("."), 0)
        free = _free_bytes(where)
        return fail(
            f"no space left on device in {where}: {format_bytes(needed)} needed, "
            f"{format_bytes(free)} free; free some space or point --cache-dir elsewhere"
        )
    tries = f" after {attempts} attempt{'s' if attempts != 1 else ''}"
    if failure.retried_by_hub:
        tries = " (after huggingface_hub's own retries)"
    return fail(f"could not download {what} from {endpoint}{tries}: {failure.reason}")


def download(
    repo_id: str,
    commit: str,
    names: Sequence[str],
    *,
    into: Path,
    token: str | None,
    endpoint: str,
    force: bool,
    tqdm_class: type | None,
) -> None:
    """Download the repo files `names` at `commit` into the folder `into`, 8 at a time.

    A file appears in `into` only once whole; huggingface_hub keeps its bookkeeping (and
    the partial files of a killed run) under ``into/.cache``, so callers remove `into`.
    """
    from huggingface_hub import snapshot_download

    snapshot_download(
        repo_id,
        revision=commit,
        local_dir=into,
        # Exact names: escape the characters fnmatch would read as a pattern.
        allow_patterns=[glob.escape(name) for name in names],
        token=token,
        endpoint=endpoint,
        force_download=force,
        tqdm_class=tqdm_class,
    )


def check_free_space(where: Path, needed: int, *, repo_id: str) -> None:
    """Raise ModelDownloadError before downloading if `needed` bytes cannot fit at `where`."""
    free = _free_bytes(where)
    if needed > free:
        raise ModelDownloadError(
            f"not enough disk space in {where} for {repo_id}: {format_bytes(needed)} needed, "
            f"{format_bytes(free)} free; free some space or point --cache-dir elsewhere",
            repo_id=repo_id,
        )


def _network_errors() -> tuple[type[Exception], ...]:
    """What huggingface_hub's HTTP client raises for timeouts, resets and cut-off bodies."""
    import httpx2

    return (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)


def _free_bytes(where: Path) -> int:
    for path in (where, *where.parents):
        try:
            return shutil.disk_usage(path).free
        except OSError:
            continue
    return 0


def _retry_after(response: object) -> float | None:
    headers = getattr(response, "headers", None)
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _root_cause(error: BaseException) -> BaseException:
    """The Hub error behind huggingface_hub's wrappers (LocalEntryNotFoundError, ValueError)."""
    from huggingface_hub.errors import HfHubHTTPError

    seen = 0
    current = error
    while not isinstance(current, HfHubHTTPError) and current.__cause__ is not None and seen < 5:
        current = current.__cause__
        seen += 1
    return current if isinstance(current, HfHubHTTPError | OSError) else error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return redact(text.splitlines()[0]) if text else ""
