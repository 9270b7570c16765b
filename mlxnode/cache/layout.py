"""Where the cache keeps each model on disk, and the metadata file that describes it.

One directory per model, plain files only, so mlx-lm loads a snapshot directory as
is and the Ansible fanout mode can rsync single files between hosts::

    <cache>/<org>--<name>/snapshots/<commit>/<files>   complete, verified files only
    <cache>/<org>--<name>/refs/<revision>              -> the last commit completed
    <cache>/<org>--<name>/mlxnode.json                 sizes, hashes, prewarm records
    <cache>/<org>--<name>/.staging/<commit>/           huggingface_hub's local_dir downloads
    <cache>/.locks/<org>--<name>.lock                  one lock per model

Every path is built from a validated repo id, revision, commit or repo file name,
and checked to resolve inside the cache, so nothing here can reach outside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import CacheError, UsageError
from ..files import write_atomic

METADATA_FILE = "mlxnode.json"
METADATA_FORMAT = 1
SNAPSHOTS_DIR = "snapshots"
REFS_DIR = "refs"
STAGING_DIR = ".staging"
LOCKS_DIR = ".locks"
# Separates org and name in a model's directory name, as in the Hugging Face cache.
FOLDER_SEPARATOR = "--"

# One part of a Hub repo id: word characters, '.', '-', starting and ending with a word character.
_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")
_REVISION = re.compile(r"[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_MAX_REVISION_LENGTH = 255


def validate_repo_id(repo_id: str) -> str:
    """Return `repo_id` if it is a plain ``org/name`` Hub id, else raise UsageError.

    Stricter than the Hub on purpose: the id becomes a directory name, so path
    separators, ``..``, ``--``, absolute paths and anything else unusual are refused.
    """
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    if (
        len(parts) != 2
        or not all(_REPO_PART.fullmatch(p) for p in parts)
        or any(".." in p or FOLDER_SEPARATOR in p for p in parts)
        or parts[1].endswith(".git")
    ):
        raise UsageError(
            f"{repo_id!r} is not a Hub repo id; expected org/name (letters, digits, '_', '.', '-', "
            "no '..' or '--'), or use --model-path for a local directory"
        )
    return repo_id


def validate_revision(revision: str) -> str:
    """Return `revision` if it is a safe branch, tag or commit name, else raise UsageError."""
    if (
        not isinstance(revision, str)
        or len(revision) > _MAX_REVISION_LENGTH
        or not _REVISION.fullmatch(revision)
        or any(part in (".", "..") for part in revision.split("/"))
    ):
        raise UsageError(f"{revision!r} is not a valid revision (a branch, tag or commit hash)")
    return revision


def is_commit(revision: str) -> bool:
    return bool(_COMMIT.fullmatch(revision))


def check_commit(commit: str, *, repo_id: str) -> str:
    if not isinstance(commit, str) or not is_commit(commit):
        raise CacheError(f"the Hub answered commit {commit!r} for {repo_id}, not a 40-digit hash")
    return commit


def check_repo_filename(name: str, *, repo_id: str) -> str:
    """Return `name` if it is a relative path inside a repo, else raise CacheError."""
    path = PurePosixPath(name)
    if (
        not name
        or "\\" in name
        or "\0" in name
        or path.is_absolute()
        or any(part in ("", ".", "..") for part in name.split("/"))
    ):
        raise CacheError(f"{repo_id} lists a file with an unsafe name {name!r}; refusing it")
    return name


def folder_name(repo_id: str) -> str:
    """``org/name`` -> ``org--name``."""
    return validate_repo_id(repo_id).replace("/", FOLDER_SEPARATOR)


def repo_id_from_folder(name: str) -> str | None:
    """``org--name`` -> ``org/name``, or None if `name` is not a model directory name."""
    org, sep, rest = name.partition(FOLDER_SEPARATOR)
    if not sep:
        return None
    try:
        return validate_repo_id(f"{org}/{rest}")
    except UsageError:
        return None


def ensure_inside(path: Path, root: Path) -> Path:
    """Resolve `path` (following symlinks) and raise CacheError unless it lies inside `root`."""
    resolved_root = root.resolve()
    resolved = path.resolve()
    if resolved != resolved_root and resolved_root not in resolved.parents:
        raise CacheError(
            f"{path} resolves to {resolved}, outside the cache {resolved_root}; "
            "refusing to touch it",
            path=str(path),
        )
    return resolved


@dataclass(frozen=True)
class ModelPaths:
    """The paths of one model in a cache directory."""

    cache_dir: Path
    repo_id: str

    @property
    def root(self) -> Path:
        return self.cache_dir / folder_name(self.repo_id)

    @property
    def metadata(self) -> Path:
        return self.root / METADATA_FILE

    @property
    def lock(self) -> Path:
        # Outside the model directory, so `cache clear` can remove the model while holding it.
        return self.cache_dir / LOCKS_DIR / f"{folder_name(self.repo_id)}.lock"

    def snapshot(self, commit: str) -> Path:
        return self.root / SNAPSHOTS_DIR / check_commit(commit, repo_id=self.repo_id)

    def staging(self, commit: str) -> Path:
        return self.root / STAGING_DIR / check_commit(commit, repo_id=self.repo_id)

    def ref(self, revision: str) -> Path:
        return self.root / REFS_DIR / validate_revision(revision)

    def file(self, commit: str, name: str) -> Path:
        return self.snapshot(commit) / check_repo_filename(name, repo_id=self.repo_id)

    def read_ref(self, revision: str) -> str | None:
        """The commit `revision` named when a prewarm of it last completed, if any."""
        if is_commit(revision):
            return revision
        try:
            commit = self.ref(revision).read_text(encoding="utf-8").strip()
        except OSError:
            return None
        return commit if is_commit(commit) else None

    def write_ref(self, revision: str, commit: str) -> None:
        if is_commit(revision):
            return
        atomic_write_text(self.ref(revision), check_commit(commit, repo_id=self.repo_id) + "\n")


@dataclass
class FileRecord:
    """What the Hub says about one file, plus its sha256 once known."""

    size: int | None = None
    sha256: str | None = None  # the LFS oid, or computed after download for small files
    blob_id: str | None = None  # git blob sha1 (of the content, or of the LFS pointer)
    lfs: bool = False


@dataclass
class PrewarmRecord:
    """One set of ranks a commit was made complete for."""

    ranks: list[int]
    world_size: int
    strategy: str
    split: list[int] | None
    all_files: bool
    files: list[str]
    at: float

    def key(self) -> tuple:
        return (tuple(self.ranks), self.world_size, self.strategy, self.split, self.all_files)


@dataclass
class CommitRecord:
    files: dict[str, FileRecord] = field(default_factory=dict)
    prewarmed: list[PrewarmRecord] = field(default_factory=list)
    resolved_at: float = 0.0


@dataclass
class ModelMetadata:
    """The contents of ``mlxnode.json``."""

    repo_id: str
    commits: dict[str, CommitRecord] = field(default_factory=dict)
    last_used: float | None = None
    format: int = METADATA_FORMAT

    def commit(self, commit: str) -> CommitRecord:
        return self.commits.setdefault(commit, CommitRecord())

    def record_prewarm(self, commit: str, record: PrewarmRecord) -> None:
        entry = self.commit(commit)
        entry.prewarmed = [p for p in entry.prewarmed if p.key() != record.key()] + [record]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], *, path: Path) -> ModelMetadata:
        try:
            commits = {
                sha: CommitRecord(
                    files={n: FileRecord(**f) for n, f in c.get("files", {}).items()},
                    prewarmed=[PrewarmRecord(**p) for p in c.get("prewarmed", [])],
                    resolved_at=float(c.get("resolved_at", 0.0)),
                )
                for sha, c in data.get("commits", {}).items()
            }
            return cls(
                repo_id=str(data["repo_id"]),
                commits=commits,
                last_used=data.get("last_used"),
                format=int(data.get("format", METADATA_FORMAT)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CacheError(
                f"{path} is not valid cache metadata ({e}); "
                "run `mlxnode cache clear MODEL` and prewarm it again",
                path=str(path),
            ) from e


def read_metadata(paths: ModelPaths) -> ModelMetadata:
    """The model's metadata, or an empty record if there is none yet."""
    try:
        text = paths.metadata.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ModelMetadata(repo_id=paths.repo_id)
    except OSError as e:
        raise CacheError(
            f"cannot read {paths.metadata}: {e.strerror}", path=str(paths.metadata)
        ) from e
    try:
        data = json.loads(text)
    except ValueError as e:
        raise CacheError(
            f"{paths.metadata} is not valid JSON ({e}); run `mlxnode cache clear "
            f"{paths.repo_id}` and prewarm it again",
            path=str(paths.metadata),
        ) from e
    return ModelMetadata.from_json(data, path=paths.metadata)


def write_metadata(paths: ModelPaths, metadata: ModelMetadata) -> None:
    atomic_write_text(paths.metadata, json.dumps(metadata.to_json(), indent=2, sort_keys=True))


def atomic_write_text(path: Path, text: str) -> None:
    """`write_atomic`, with a failure reported as the cache's own error."""
    try:
        write_atomic(path, text)
    except OSError as e:
        raise CacheError(f"cannot write {path}: {e.strerror or e}", path=str(path)) from e


def iter_models(cache_dir: Path) -> Iterator[ModelPaths]:
    """Every model directory mlxnode made in the cache, sorted.

    That is a real directory named ``org--name`` holding mlxnode's metadata file (written
    before any model file): another tool's ``a--b`` directory is never listed or cleared.
    """
    try:
        entries = sorted(cache_dir.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        repo_id = repo_id_from_folder(entry.name)
        if repo_id is not None and is_model_dir(entry):
            yield ModelPaths(cache_dir, repo_id)


def is_model_dir(path: Path) -> bool:
    """`path` is a directory (not a symlink) holding mlxnode's metadata file."""
    metadata = path / METADATA_FILE
    return (
        path.is_dir() and not path.is_symlink() and metadata.is_file() and not metadata.is_symlink()
    )


def disk_usage(path: Path) -> int:
    """Bytes the files under `path` take (apparent sizes; symlinks not followed)."""
    total = 0
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
