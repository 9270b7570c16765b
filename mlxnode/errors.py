"""Every error mlxnode raises on purpose, and the exit code the CLI gives each.

Library code raises these with structured attributes; only `mlxnode.cli` turns
them into one line on stderr and an exit code (documented in the README).
"""

from __future__ import annotations


class MlxnodeError(Exception):
    """Base class: something the user can fix, with a message that says how."""

    exit_code = 1

    def __str__(self) -> str:
        # The message alone: OSError subclasses would otherwise render "[Errno None] ...".
        return str(self.args[0]) if self.args else ""


class ConfigError(MlxnodeError, ValueError):
    """A configuration file, environment variable or flag has a bad value.

    Attributes:
        source: Where the bad value came from (a file path, ``env:NAME`` or ``--flag``).
        key: The dotted key (``generation.max_tokens``), when one is to blame.
    """

    exit_code = 2

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        # A key read from a file may hold anything; quote it unless it prints cleanly.
        shown_key = key if key is None or key.isprintable() else repr(key)
        prefix = ": ".join(p for p in (source, shown_key) if p)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.source = source
        self.key = key


class UsageError(MlxnodeError, ValueError):
    """The command line asks for something impossible (bad prompt file, bad split...)."""

    exit_code = 2


class CacheError(MlxnodeError, OSError):
    """The model cache is missing files, corrupt, locked or outside its directory."""

    exit_code = 3

    def __init__(self, message: str, *, path: str | None = None):
        super().__init__(message)
        self.path = path


class ModelDownloadError(MlxnodeError, ConnectionError):
    """A model file could not be fetched from the Hub (after retries where they help).

    Attributes:
        repo_id: The Hub repository.
        filename: The file, when one file is to blame.
        status: The HTTP status, when the Hub answered.
    """

    exit_code = 4

    def __init__(
        self,
        message: str,
        *,
        repo_id: str | None = None,
        filename: str | None = None,
        status: int | None = None,
    ):
        super().__init__(message)
        self.repo_id = repo_id
        self.filename = filename
        self.status = status


class ModelLoadError(MlxnodeError, RuntimeError):
    """A cached model cannot be loaded or cannot be split the way that was asked."""

    exit_code = 5


class DistributedSetupError(MlxnodeError, RuntimeError):
    """The ranks could not form a group, or a rank stopped answering.

    Attributes:
        rank: The rank that reports the problem.
        host: The host it runs on, when known.
    """

    exit_code = 6

    def __init__(self, message: str, *, rank: int | None = None, host: str | None = None):
        super().__init__(message)
        self.rank = rank
        self.host = host


class PreflightError(DistributedSetupError):
    """A host is not ready for a run: unreachable, busy ports, or versions that differ.

    Attributes:
        table: Every host's findings, one line per host, for the CLI to print.
    """

    def __init__(
        self,
        message: str,
        *,
        rank: int | None = None,
        host: str | None = None,
        table: str = "",
    ):
        super().__init__(message, rank=rank, host=host)
        self.table = table


class ClusterBusyError(DistributedSetupError):
    """Another run holds the launcher's cluster lock."""

    exit_code = 8


class InferenceError(MlxnodeError, RuntimeError):
    """Generation cannot run on this input (prompt too long, empty batch...)."""

    exit_code = 7


class Stopped(KeyboardInterrupt):
    """The process was asked to stop by a signal (SIGTERM, SIGHUP); handled like Ctrl-C.

    Attributes:
        signum: The signal; the CLI exits with 128 + signum.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# Errors the user caused (input, cache, download, model): a rank that raises one is the
# cause of a failed run, not a casualty of it, and its exit code is passed through.
USER_ERRORS: tuple[type[MlxnodeError], ...] = (
    ConfigError,
    UsageError,
    CacheError,
    ModelDownloadError,
    ModelLoadError,
    InferenceError,
)
USER_ERROR_CODES: frozenset[int] = frozenset(e.exit_code for e in USER_ERRORS)


def error_class(name: str | None) -> type[MlxnodeError]:
    """The error class called `name` (as a rank's status record names it); else MlxnodeError."""
    found = globals().get(name or "")
    if isinstance(found, type) and issubclass(found, MlxnodeError):
        return found
    return MlxnodeError


# The README's exit-code table is generated from this list, so keep it in sync here.
EXIT_CODES: list[tuple[int, str]] = [
    (0, "success"),
    (1, "unexpected internal error (rerun with --log-level DEBUG for the traceback)"),
    (2, "bad configuration, flag or input file (ConfigError, UsageError)"),
    (3, "model cache problem: missing, corrupt, locked or unsafe path (CacheError)"),
    (4, "download from the Hub failed (ModelDownloadError)"),
    (5, "model cannot be loaded or sharded as asked (ModelLoadError)"),
    (
        6,
        "ranks could not connect, a host is not ready (`mlxnode health`, the launcher's "
        "pre-flight), or a rank died or timed out (DistributedSetupError, PreflightError)",
    ),
    (7, "inference failed on the given input (InferenceError)"),
    (8, "cluster busy: another run holds the launcher's lock (ClusterBusyError)"),
    (129, "stopped by SIGHUP; every rank on every host was stopped first"),
    (130, "interrupted (Ctrl-C)"),
    (143, "stopped by SIGTERM; every rank on every host was stopped first"),
]
