"""`ModelCacheManager`: fetch exactly the files given ranks need, verified, into the cache."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CacheError, ModelDownloadError
from ..formatting import format_bytes
from . import hub, layout
from .hub import TransientError, check_free_space, describe_error, with_retries
from .layout import FileRecord, ModelMetadata, ModelPaths, PrewarmRecord
from .plan import CONFIG_FILE, INDEX_FILE, FilePlan, RankSpec, metadata_files, plan_files, read_json
from .progress import Progress

if TYPE_CHECKING:
    from ..config import Config

logger = logging.getLogger(__name__)


@dataclass
class LocalModel:
    """A model directory ready to load, and what it took to get it there."""

    path: Path
    repo_id: str
    commit: str
    files: list[str]
    fetched_bytes: int
    fetched_files: list[str]
    seconds: float
    sizes: dict[str, int | None] = field(default_factory=dict)


@dataclass
class ModelPlan:
    """The files a set of ranks needs, and which of them are already cached."""

    path: Path
    repo_id: str
    commit: str
    plan: FilePlan
    sizes: dict[str, int | None]
    cached: set[str]

    @property
    def missing(self) -> list[str]:
        return [f for f in self.plan.files if f not in self.cached]


@dataclass
class VerifyReport:
    """The outcome of re-hashing the files a set of ranks needs."""

    path: Path
    repo_id: str
    commit: str
    checked: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    corrupt: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt


@dataclass
class CachedCommit:
    commit: str
    revisions: list[str]
    path: Path
    files_present: int
    files_expected: int
    complete_for: list[PrewarmRecord]


@dataclass
class CachedModel:
    repo_id: str
    path: Path
    size_bytes: int
    last_used: float | None
    commits: list[CachedCommit]


@dataclass(frozen=True)
class _Commit:
    """One resolved commit of a model: where it lives and what the Hub says it holds."""

    paths: ModelPaths
    revision: str
    commit: str
    files: dict[str, FileRecord]
    metadata: ModelMetadata

    @property
    def snapshot(self) -> Path:
        return self.paths.snapshot(self.commit)

    def file(self, name: str) -> Path:
        return self.paths.file(self.commit, name)

    def present(self, name: str) -> bool:
        """In the snapshot, with the size the Hub gives (if it gives one)."""
        size = _size(self.file(name))
        record = self.files.get(name)
        return size is not None and (record is None or record.size in (None, size))


class ModelCacheManager:
    """Downloads models from the Hub into a cache directory, one rank's files at a time.

    Args:
        cache_dir: The cache directory (created when first needed).
        offline: Use only cached files; also on when ``HF_HUB_OFFLINE`` is set.
        max_retries: Further attempts per request on transient errors.
        backoff_base: Seconds before the first retry; doubles each retry, with jitter.
        lock_timeout: Seconds to wait for another process holding a model's lock.
        token: Hub token; None lets huggingface_hub use ``HF_TOKEN`` or the stored login.
        endpoint: Hub URL; None lets huggingface_hub use ``HF_ENDPOINT`` or huggingface.co.
        progress: Show download progress (bars on a terminal, log lines otherwise).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        *,
        offline: bool = False,
        max_retries: int = 5,
        backoff_base: float = 1.0,
        lock_timeout: float = 600.0,
        token: str | None = None,
        endpoint: str | None = None,
        progress: bool = True,
    ) -> None:
        from huggingface_hub import constants

        self.cache_dir = Path(cache_dir).expanduser().absolute()
        self.offline = bool(offline) or constants.is_offline_mode()
        self.max_retries = max(int(max_retries), 0)
        self.backoff_base = max(float(backoff_base), 0.0)
        self.lock_timeout = max(float(lock_timeout), 0.0)
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.progress = progress
        self._token = token

    def __repr__(self) -> str:
        # Never show the token.
        return (
            f"ModelCacheManager({str(self.cache_dir)!r}, offline={self.offline}, "
            f"endpoint={self.endpoint!r})"
        )

    @classmethod
    def from_config(cls, config: Config, *, progress: bool = True) -> ModelCacheManager:
        """A manager for the ``cache`` section of a resolved configuration."""
        cache = config.cache
        return cls(
            cache.dir,
            offline=cache.offline,
            max_retries=cache.max_retries,
            backoff_base=cache.backoff_base,
            lock_timeout=cache.lock_timeout,
            progress=progress,
        )

    # -- public API

    def fetch_metadata(self, repo_id: str, *, revision: str = "main") -> Path:
        """Fetch config, tokenizer and index files (no weights); return the snapshot dir.

        Weight files already cached are checked by size, because loading the model reads
        every one of them: offline, one of the wrong size is refused; online it is
        discarded, to be fetched again.

        Raises:
            ModelDownloadError: the Hub refused or failed (after retries where they help).
            CacheError: offline and the files are not cached or a weight file has the wrong
                size, or the lock timed out.
        """
        with self._resolved(repo_id, revision) as model:
            self._fetch(model, metadata_files(model.files), force=False)
            self._drop_damaged_weights(model)
        return model.snapshot

    def ensure_model(
        self,
        repo_id: str,
        spec: RankSpec | None = None,
        *,
        revision: str = "main",
        force: bool = False,
        verify_hashes: bool = False,
    ) -> LocalModel:
        """Make the files `spec`'s ranks need present and verified; return where they are.

        Metadata comes first; then, for a pipeline, only the weight files holding the
        ranks' layers plus the non-layer weights; for tensor parallelism (or
        ``strategy="auto"``, where the engine decides later) every weight file.

        Args:
            repo_id: Hub repo, ``org/name``.
            spec: The ranks this host runs and how the model is split (default: rank 0 of 1).
            revision: Branch, tag or commit.
            force: Fetch the needed files again even if cached.
            verify_hashes: Re-hash every needed file before returning (slow for big models).

        Raises:
            UsageError: the split does not fit the model.
            ModelDownloadError: the Hub refused or failed, or the disk is full.
            CacheError: offline with files missing, a file does not match its metadata,
                or the lock timed out.
        """
        started = time.monotonic()
        spec = spec or RankSpec()
        with self._resolved(repo_id, revision) as model:
            fetched = self._fetch(model, metadata_files(model.files), force=force)
            plan = self._plan(model, spec)
            fetched += self._fetch(model, list(plan.weights), force=force)
            self._check(model, plan.files, verify_hashes=verify_hashes)
            self._record_prewarm(model, spec, plan)
        return LocalModel(
            path=model.snapshot,
            repo_id=repo_id,
            commit=model.commit,
            files=plan.files,
            fetched_bytes=sum(model.files[f].size or 0 for f in fetched),
            fetched_files=fetched,
            seconds=time.monotonic() - started,
            sizes=_sizes(model, plan.files),
        )

    def plan(
        self, repo_id: str, spec: RankSpec | None = None, *, revision: str = "main"
    ) -> ModelPlan:
        """The files `spec`'s ranks would need, fetching metadata but no weights (``--dry-run``)."""
        spec = spec or RankSpec()
        with self._resolved(repo_id, revision) as model:
            self._fetch(model, metadata_files(model.files), force=False)
            plan = self._plan(model, spec)
        return ModelPlan(
            path=model.snapshot,
            repo_id=repo_id,
            commit=model.commit,
            plan=plan,
            sizes=_sizes(model, plan.files),
            cached={f for f in plan.files if model.present(f)},
        )

    def verify(
        self, repo_id: str, spec: RankSpec | None = None, *, revision: str = "main"
    ) -> VerifyReport:
        """Re-hash the cached files `spec`'s ranks need against the recorded metadata.

        Never downloads.

        Raises:
            CacheError: the model (or revision) is not in the cache at all.
        """
        spec = spec or RankSpec()
        paths = self._paths(repo_id)
        layout.validate_revision(revision)
        metadata = layout.read_metadata(paths)
        commit = paths.read_ref(revision)
        if commit is None or commit not in metadata.commits:
            raise CacheError(
                f"{repo_id} (revision {revision}) is not in the cache {self.cache_dir}; "
                f"run `mlxnode cache prewarm {repo_id}` first",
                path=str(paths.root),
            )
        model = _Commit(paths, revision, commit, metadata.commits[commit].files, metadata)
        report = VerifyReport(path=model.snapshot, repo_id=repo_id, commit=commit)
        try:
            wanted = self._plan(model, spec).files
        except CacheError:
            wanted = sorted(model.files) if spec.all_files else metadata_files(model.files)
        for name in wanted:
            target = model.file(name)
            if not target.is_file():
                report.missing.append(name)
                continue
            report.checked.append(name)
            problem = _mismatch(target, model.files.get(name), hash_it=True)
            if problem is not None:
                report.corrupt[name] = problem
        return report

    def prewarm_records(self, repo_id: str, *, revision: str = "main") -> list[PrewarmRecord]:
        """The rank sets prewarms made the commit `revision` names complete for, oldest first.

        Empty when the model, the revision or its records are not in the cache.
        """
        paths = self._paths(repo_id)
        commit = paths.read_ref(layout.validate_revision(revision))
        if commit is None or not paths.metadata.is_file():
            return []
        entry = layout.read_metadata(paths).commits.get(commit)
        return list(entry.prewarmed) if entry is not None else []

    def list_models(self) -> list[CachedModel]:
        """Every model in the cache, with what each cached commit holds."""
        return [self._describe(paths) for paths in layout.iter_models(self.cache_dir)]

    def model_size(self, repo_id: str | None = None) -> int:
        """Bytes on disk for one model, or for every model in the cache."""
        if repo_id is None:
            return sum(
                layout.disk_usage(paths.root) for paths in layout.iter_models(self.cache_dir)
            )
        paths = self._paths(repo_id)
        if not paths.root.is_dir():
            raise self._not_cached(paths)
        return layout.disk_usage(paths.root)

    def remove(self, repo_id: str) -> int:
        """Delete one model from the cache (never anything outside it); return bytes freed.

        Raises:
            CacheError: the model is not cached, is a symlink, resolves outside the cache,
                has no mlxnode.json (another tool's directory), or another process holds
                its lock.
        """
        paths = self._paths(repo_id)
        if not os.path.lexists(paths.root):
            raise self._not_cached(paths)
        if paths.root.is_symlink() or not paths.root.is_dir():
            raise CacheError(
                f"{paths.root} is a symlink or not a directory; refusing to delete it",
                path=str(paths.root),
            )
        if not layout.is_model_dir(paths.root):
            raise CacheError(
                f"{paths.root} has no {layout.METADATA_FILE}, so mlxnode did not make it; "
                "refusing to delete it (remove it by hand if it is yours to delete)",
                path=str(paths.root),
            )
        layout.ensure_inside(paths.root, self.cache_dir)
        with self._locked(paths):
            freed = layout.disk_usage(paths.root)
            shutil.rmtree(paths.root)
        logger.info("removed %s (%s) from %s", repo_id, format_bytes(freed), self.cache_dir)
        return freed

    # -- resolving a revision

    def _not_cached(self, paths: ModelPaths) -> CacheError:
        return CacheError(
            f"{paths.repo_id} is not in the cache {self.cache_dir}", path=str(paths.root)
        )

    def _paths(self, repo_id: str) -> ModelPaths:
        paths = ModelPaths(self.cache_dir, layout.validate_repo_id(repo_id))
        if os.path.lexists(paths.root):
            layout.ensure_inside(paths.root, self.cache_dir)
        return paths

    @contextmanager
    def _locked(self, paths: ModelPaths) -> Iterator[None]:
        from filelock import FileLock, Timeout

        paths.lock.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(paths.lock)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info("waiting up to %.0fs for the lock %s", self.lock_timeout, paths.lock)
            try:
                lock.acquire(timeout=self.lock_timeout)
            except Timeout:
                raise CacheError(
                    f"{paths.repo_id} is locked by another process (lock file {paths.lock}) and "
                    f"was not released within {self.lock_timeout:g}s; wait for the other "
                    "prewarm to finish, raise --lock-timeout, or delete the lock file if no "
                    "mlxnode process is running",
                    path=str(paths.lock),
                ) from None
        try:
            yield
        finally:
            lock.release()

    @contextmanager
    def _resolved(self, repo_id: str, revision: str) -> Iterator[_Commit]:
        """Under the model's lock: the commit `revision` names, from the Hub or the cache."""
        paths = self._paths(repo_id)
        layout.validate_revision(revision)
        with self._locked(paths):
            metadata = layout.read_metadata(paths)
            commit, files = self._resolve(paths, revision, metadata)
            # Written before any model file, so `cache list` and `clear` know the directory.
            layout.write_metadata(paths, metadata)
            yield _Commit(paths, revision, commit, files, metadata)
            # Again, with the sha256 of small files learned while verifying them.
            layout.write_metadata(paths, metadata)

    def _resolve(
        self, paths: ModelPaths, revision: str, metadata: ModelMetadata
    ) -> tuple[str, dict[str, FileRecord]]:
        """The commit `revision` names and its files, from the Hub or (offline) the cache.

        Records what the Hub said in `metadata`; the ref moves only once a snapshot of the
        commit is complete (`ensure_model`): until then offline runs keep the previous one.
        """
        cached_commit = paths.read_ref(revision)
        cached = metadata.commits.get(cached_commit) if cached_commit else None
        if self.offline:
            if cached_commit is None or cached is None or not cached.files:
                raise CacheError(
                    f"{paths.repo_id} (revision {revision}) is not in the cache "
                    f"{self.cache_dir} and offline mode is on; run `mlxnode cache prewarm "
                    f"{paths.repo_id}` while online",
                    path=str(paths.root),
                )
            return cached_commit, cached.files
        if layout.is_commit(revision) and cached is not None and cached.files:
            # A commit never changes: what we recorded for it is still what the Hub has.
            return revision, cached.files
        try:
            commit, files = self._model_info(paths, revision)
        except ModelDownloadError as e:
            if cached is None or not cached.files or e.status in (401, 403, 404):
                raise
            logger.warning(
                "cannot reach the Hub (%s); using the cached commit %s of %s %s",
                e,
                cached_commit,
                paths.repo_id,
                revision,
            )
            return cached_commit, cached.files
        entry = metadata.commit(commit)
        for name, record in files.items():
            old = entry.files.get(name)
            # Small files have no sha256 on the Hub; keep the one computed on download.
            if record.sha256 is None and old is not None and old.blob_id == record.blob_id:
                record.sha256 = old.sha256
        entry.files = files
        entry.resolved_at = time.time()
        return commit, files

    def _model_info(self, paths: ModelPaths, revision: str) -> tuple[str, dict[str, FileRecord]]:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.endpoint, token=self._token)
        info = with_retries(
            lambda: api.model_info(paths.repo_id, revision=revision, files_metadata=True),
            what=f"{paths.repo_id}@{revision} metadata",
            max_retries=self.max_retries,
            backoff_base=self.backoff_base,
            describe=functools.partial(
                describe_error, repo_id=paths.repo_id, revision=revision, endpoint=self.endpoint
            ),
        )
        commit = layout.check_commit(info.sha, repo_id=paths.repo_id)
        files: dict[str, FileRecord] = {}
        for sibling in info.siblings or []:
            name = layout.check_repo_filename(sibling.rfilename, repo_id=paths.repo_id)
            lfs = sibling.lfs
            files[name] = FileRecord(
                size=sibling.size,
                sha256=lfs.sha256 if lfs is not None else None,
                blob_id=sibling.blob_id,
                lfs=lfs is not None,
            )
        return commit, files

    def _plan(self, model: _Commit, spec: RankSpec) -> FilePlan:
        config = read_json(model.file(CONFIG_FILE), what=CONFIG_FILE) or {}
        index = None
        if INDEX_FILE in model.files:
            index = read_json(model.file(INDEX_FILE), what=INDEX_FILE)
            if index is None:
                raise CacheError(
                    f"{INDEX_FILE} of {model.paths.repo_id} is not in {model.snapshot}; run "
                    f"`mlxnode cache prewarm {model.paths.repo_id}` while online",
                    path=str(model.snapshot),
                )
        return plan_files(
            spec, repo_files=model.files, config=config, index=index, repo_id=model.paths.repo_id
        )

    def _record_prewarm(self, model: _Commit, spec: RankSpec, plan: FilePlan) -> None:
        """Record which ranks the commit is now complete for, then move the ref to it."""
        metadata = model.metadata
        metadata.record_prewarm(
            model.commit,
            PrewarmRecord(
                ranks=list(spec.ranks),
                world_size=spec.world_size,
                strategy=spec.strategy,
                split=None if plan.split is None else list(plan.split),
                all_files=spec.all_files,
                files=plan.files,
                at=time.time(),
            ),
        )
        metadata.last_used = time.time()
        layout.write_metadata(model.paths, metadata)
        model.paths.write_ref(model.revision, model.commit)

    # -- fetching files

    def _fetch(self, model: _Commit, names: list[str], *, force: bool) -> list[str]:
        """Download the `names` not yet in the snapshot (all with `force`); return them.

        Files arrive in a staging folder and move into the snapshot only once their size
        and sha256 match the Hub's; whatever else is left in staging is removed.
        """
        todo = [n for n in names if force or not model.present(n)]
        if not todo:
            return []
        if self.offline:
            raise self._offline_error(model, todo)
        repo_id = model.paths.repo_id
        needed = sum(model.files[n].size or 0 for n in todo)
        check_free_space(model.paths.root, needed, repo_id=repo_id)
        logger.debug("fetching %d file(s), %s: %s", len(todo), format_bytes(needed), todo)
        done: list[str] = []
        staging = model.paths.staging(model.commit)
        # A killed run may have left whole files there: keep those that verify.
        self._promote(model, todo, staging, done)
        shutil.rmtree(model.paths.root / layout.STAGING_DIR, ignore_errors=True)
        progress = Progress(needed, label=f"{repo_id} ({len(todo)} files)", enabled=self.progress)

        def missing() -> list[str]:
            return [n for n in todo if n not in done]

        def attempt() -> None:
            left = missing()
            tqdm_class = progress.attempt(sum(model.files[n].size or 0 for n in done))
            try:
                hub.download(
                    repo_id,
                    model.commit,
                    left,
                    into=staging,
                    token=self._token,
                    endpoint=self.endpoint,
                    force=force,
                    tqdm_class=tqdm_class,
                )
            finally:
                problems = self._promote(model, left, staging, done)
            if missing():
                name = missing()[0]
                raise TransientError(problems.get(name, f"{name} did not arrive"))

        def describe(error: BaseException, failure: hub.Failure, attempts: int) -> Exception:
            left = missing()
            return describe_error(
                error,
                failure,
                attempts,
                repo_id=repo_id,
                revision=model.revision,
                endpoint=self.endpoint,
                filename=left[0] if len(left) == 1 else None,
                disk=(model.paths.root, needed),
            )

        try:
            with_retries(
                attempt,
                what=f"{repo_id}: {', '.join(missing()[:3])}",
                max_retries=self.max_retries,
                backoff_base=self.backoff_base,
                describe=describe,
                download=True,
            )
        finally:
            shutil.rmtree(model.paths.root / layout.STAGING_DIR, ignore_errors=True)
        progress.close()
        return todo

    def _promote(
        self, model: _Commit, names: list[str], staging: Path, done: list[str]
    ) -> dict[str, str]:
        """Move the staged `names` that match the Hub's size and sha256 into the snapshot.

        Appends what moved to `done`; deletes and returns (name -> why) what did not match.
        """
        problems: dict[str, str] = {}
        for name in names:
            staged = staging / layout.check_repo_filename(name, repo_id=model.paths.repo_id)
            if staged.is_symlink() or not staged.is_file():
                continue
            problem = _mismatch(staged, model.files.get(name), hash_it=True)
            if problem is not None:
                logger.debug("%s: %s is wrong (%s)", model.paths.repo_id, name, problem)
                staged.unlink()
                problems[name] = f"downloaded {name} is wrong ({problem})"
                continue
            target = model.file(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
            done.append(name)
        return problems

    def _offline_error(self, model: _Commit, todo: list[str]) -> CacheError:
        # A file of the wrong size (cut short by a full disk or a bad copy) is named as such.
        sizes = {name: _size(model.file(name)) for name in todo}
        absent = [name for name, size in sizes.items() if size is None]
        damaged = [
            f"{name} ({size} bytes, expected {model.files[name].size})"
            for name, size in sizes.items()
            if size is not None
        ]
        found = ([f"{len(absent)} not cached: {', '.join(absent)}"] if absent else []) + (
            [f"{len(damaged)} of the wrong size: {', '.join(damaged)}"] if damaged else []
        )
        return CacheError(
            f"offline mode is on and needed files of {model.paths.repo_id} in "
            f"{model.snapshot} are unusable: {'; '.join(found)}; run `mlxnode cache "
            f"prewarm {model.paths.repo_id}` while online",
            path=str(model.snapshot),
        )

    def _drop_damaged_weights(self, model: _Commit) -> None:
        for name, record in sorted(model.files.items()):
            target = model.file(name)
            size = _size(target)
            if not name.endswith(".safetensors") or None in (size, record.size):
                continue
            if size == record.size:
                continue
            if self.offline:
                raise CacheError(
                    f"cached file {target} is {size} bytes, expected {record.size} (cut "
                    f"short?); run `mlxnode cache prewarm {model.paths.repo_id} --force-download` "
                    "while online",
                    path=str(target),
                )
            logger.warning(
                "discarding %s: %d bytes, expected %d; it is fetched again",
                target,
                size,
                record.size,
            )
            target.unlink()

    def _check(self, model: _Commit, names: list[str], *, verify_hashes: bool) -> None:
        for name in names:
            target = model.file(name)
            problem = (
                "missing"
                if not target.is_file()
                else _mismatch(target, model.files.get(name), hash_it=verify_hashes)
            )
            if problem is not None:
                raise CacheError(
                    f"cached file {target} is {problem}; run `mlxnode cache prewarm "
                    f"{model.paths.repo_id} --force-download`",
                    path=str(target),
                )

    # -- describing the cache

    def _describe(self, paths: ModelPaths) -> CachedModel:
        try:
            metadata = layout.read_metadata(paths)
        except CacheError as e:
            logger.warning("%s", e)
            metadata = ModelMetadata(repo_id=paths.repo_id)
        revisions: dict[str, list[str]] = {}
        refs = paths.root / layout.REFS_DIR
        for ref in sorted(refs.rglob("*")) if refs.is_dir() else []:
            name = ref.relative_to(refs).as_posix()
            commit = paths.read_ref(name) if ref.is_file() else None
            if commit is not None:
                revisions.setdefault(commit, []).append(name)
        commits: list[CachedCommit] = []
        snapshots = paths.root / layout.SNAPSHOTS_DIR
        for snapshot in sorted(snapshots.iterdir()) if snapshots.is_dir() else []:
            if not layout.is_commit(snapshot.name):
                continue
            record = metadata.commits.get(snapshot.name, layout.CommitRecord())
            model = _Commit(paths, snapshot.name, snapshot.name, record.files, metadata)
            try:
                expected = self._plan(model, RankSpec()).files
            except Exception:  # noqa: BLE001 - a half-cached model still gets listed
                expected = metadata_files(model.files)
            commits.append(
                CachedCommit(
                    commit=model.commit,
                    revisions=revisions.get(model.commit, []),
                    path=snapshot,
                    files_present=sum(model.present(f) for f in expected),
                    files_expected=len(expected),
                    complete_for=[
                        p for p in record.prewarmed if all(model.present(f) for f in p.files)
                    ],
                )
            )
        return CachedModel(
            repo_id=paths.repo_id,
            path=paths.root,
            size_bytes=layout.disk_usage(paths.root),
            last_used=metadata.last_used,
            commits=commits,
        )


def local_model(path: str | os.PathLike[str]) -> LocalModel:
    """A `LocalModel` for a directory given with ``--model-path``: used in place, never copied.

    Raises:
        CacheError: `path` is not a directory holding a config.json.
    """
    started = time.monotonic()
    directory = Path(path).expanduser()
    if not (directory / CONFIG_FILE).is_file():
        raise CacheError(
            f"--model-path {directory} is not a model directory (no {CONFIG_FILE})",
            path=str(directory),
        )
    files = sorted(p.relative_to(directory).as_posix() for p in directory.iterdir() if p.is_file())
    return LocalModel(
        path=directory,
        repo_id=str(directory),
        commit="",
        files=files,
        fetched_bytes=0,
        fetched_files=[],
        seconds=time.monotonic() - started,
        sizes={f: _size(directory / f) for f in files},
    )


def _mismatch(path: Path, record: FileRecord | None, *, hash_it: bool) -> str | None:
    """Why `path` does not match `record` (size, then hash if asked), or None if it does.

    A small file's sha256 is learned on its first verified download and recorded.
    """
    if record is None:
        return None
    size = path.stat().st_size
    if record.size is not None and size != record.size:
        return f"{size} bytes, expected {record.size}"
    if not hash_it:
        return None
    if record.lfs or record.blob_id is None:
        with path.open("rb") as f:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    else:
        # A small file git keeps itself: the Hub gives its git blob id, not a sha256.
        data = path.read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()
        if blob != record.blob_id:
            return f"git blob {blob[:12]}..., expected {record.blob_id[:12]}..."
    if record.sha256 is not None and sha256 != record.sha256:
        return f"sha256 {sha256[:12]}..., expected {record.sha256[:12]}..."
    if record.sha256 is None:
        record.sha256 = sha256
    return None


def _sizes(model: _Commit, names: list[str]) -> dict[str, int | None]:
    return {f: model.files[f].size if f in model.files else None for f in names}


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None
