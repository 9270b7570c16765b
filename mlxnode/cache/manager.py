"""`ModelCacheManager`: fetch exactly the files given ranks need, verified, into the cache."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CacheError, ModelDownloadError
from ..formatting import format_bytes
from . import layout
from .hub import (
    TransientError,
    check_free_space,
    describe_error,
    with_retries,
)
from .layout import FileRecord, ModelMetadata, ModelPaths, PrewarmRecord
from .plan import CONFIG_FILE, INDEX_FILE, FilePlan, RankSpec, metadata_files, plan_files, read_json
from .progress import Progress

if TYPE_CHECKING:
    from ..config import Config

logger = logging.getLogger(__name__)

# Files downloaded at once, like huggingface_hub's snapshot_download.
MAX_WORKERS = 8
_HASH_CHUNK = 4 * 1024 * 1024


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
        paths = self._paths(repo_id)
        layout.validate_revision(revision)
        with self._locked(paths):
            metadata = layout.read_metadata(paths)
            commit, files = self._resolve(paths, revision, metadata)
            self._fetch(paths, revision, commit, files, metadata_files(files), force=False)
            self._drop_damaged_weights(paths, commit, files)
            layout.write_metadata(paths, metadata)
        return paths.snapshot(commit)

    def _drop_damaged_weights(
        self, paths: ModelPaths, commit: str, files: dict[str, FileRecord]
    ) -> None:
        for name, record in sorted(files.items()):
            target = paths.file(commit, name)
            size = _size(target)
            if not name.endswith(".safetensors") or None in (size, record.size):
                continue
            if size == record.size:
                continue
            if self.offline:
                raise CacheError(
                    f"cached file {target} is {size} bytes, expected {record.size} (cut "
                    f"short?); run `mlxnode cache prewarm {paths.repo_id} --force-download` "
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

    def ensure_model(
        self,
        repo_id: str,
        *,
        revision: str = "main",
        ranks: Sequence[int] = (0,),
        world_size: int = 1,
        strategy: str = "tensor",
        split: Sequence[int] | None = None,
        weights: Sequence[float] | None = None,
        all_files: bool = False,
        force: bool = False,
        verify_hashes: bool = False,
    ) -> LocalModel:
        """Make the files `ranks` need present and verified; return where they are.

        Metadata comes first; then, for a pipeline, only the weight files holding the
        ranks' layers plus the non-layer weights; for tensor parallelism (or
        ``strategy="auto"``, where the engine decides later) every weight file.

        Args:
            repo_id: Hub repo, ``org/name``.
            revision: Branch, tag or commit.
            ranks: The ranks this host runs (their files are unioned).
            world_size: Number of ranks in total.
            strategy: ``pipeline``, ``tensor`` or ``auto``.
            split: Layers per rank, in rank order (pipeline).
            weights: Relative memory per rank; layers are split in proportion.
            all_files: Fetch every file of the repo.
            force: Fetch the needed files again even if cached.
            verify_hashes: Re-hash every needed file before returning (slow for big models).

        Raises:
            UsageError: bad ranks, strategy or split.
            ModelDownloadError: the Hub refused or failed, or the disk is full.
            CacheError: offline with files missing, a file does not match its metadata,
                or the lock timed out.
        """
        started = time.monotonic()
        spec = RankSpec.make(ranks, world_size, strategy, split, weights, all_files)
        paths = self._paths(repo_id)
        layout.validate_revision(revision)
        with self._locked(paths):
            metadata = layout.read_metadata(paths)
            commit, files = self._resolve(paths, revision, metadata)
            fetched = self._fetch(
                paths, revision, commit, files, metadata_files(files), force=force
            )
            plan = self._plan(paths, commit, files, spec)
            fetched += self._fetch(paths, revision, commit, files, list(plan.weights), force=force)
            self._check(paths, commit, files, plan.files, verify_hashes=verify_hashes)
            metadata.record_prewarm(
                commit,
                PrewarmRecord(
                    ranks=list(spec.ranks),
                    world_size=spec.world_size,
                    strategy=spec.strategy,
                    split=None if plan.split is None else list(plan.split),
                    all_files=spec.all_files,
                    files=plan.files,
                    at=layout.now(),
                ),
            )
            metadata.last_used = layout.now()
            layout.write_metadata(paths, metadata)
            paths.write_ref(revision, commit)
        fetched_bytes = sum(files[f].size or 0 for f in fetched)
        return LocalModel(
            path=paths.snapshot(commit),
            repo_id=repo_id,
            commit=commit,
            files=plan.files,
            fetched_bytes=fetched_bytes,
            fetched_files=fetched,
            seconds=time.monotonic() - started,
        )

    def plan(
        self,
        repo_id: str,
        *,
        revision: str = "main",
        ranks: Sequence[int] = (0,),
        world_size: int = 1,
        strategy: str = "tensor",
        split: Sequence[int] | None = None,
        weights: Sequence[float] | None = None,
        all_files: bool = False,
    ) -> ModelPlan:
        """The files `ranks` would need, fetching metadata but no weights (``--dry-run``)."""
        spec = RankSpec.make(ranks, world_size, strategy, split, weights, all_files)
        paths = self._paths(repo_id)
        layout.validate_revision(revision)
        with self._locked(paths):
            metadata = layout.read_metadata(paths)
            commit, files = self._resolve(paths, revision, metadata)
            self._fetch(paths, revision, commit, files, metadata_files(files), force=False)
            layout.write_metadata(paths, metadata)
            plan = self._plan(paths, commit, files, spec)
        cached = {f for f in plan.files if self._present(paths, commit, f, files.get(f))}
        return ModelPlan(
            path=paths.snapshot(commit),
            repo_id=repo_id,
            commit=commit,
            plan=plan,
            sizes={f: files[f].size if f in files else None for f in plan.files},
            cached=cached,
        )

    def verify(
        self,
        repo_id: str,
        *,
        revision: str = "main",
        ranks: Sequence[int] = (0,),
        world_size: int = 1,
        strategy: str = "tensor",
        split: Sequence[int] | None = None,
        weights: Sequence[float] | None = None,
        all_files: bool = False,
    ) -> VerifyReport:
        """Re-hash the cached files `ranks` need against the recorded metadata; never downloads.

        Raises:
            CacheError: the model (or revision) is not in the cache at all.
        """
        spec = RankSpec.make(ranks, world_size, strategy, split, weights, all_files)
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
        files = metadata.commits[commit].files
        report = VerifyReport(path=paths.snapshot(commit), repo_id=repo_id, commit=commit)
        meta = metadata_files(files)
        try:
            wanted = self._plan(paths, commit, files, spec).files
        except CacheError:
            wanted = sorted(files) if spec.all_files else meta
        for name in wanted:
            record = files.get(name)
            target = paths.file(commit, name)
            if not target.is_file():
                report.missing.append(name)
                continue
            report.checked.append(name)
            problem = _mismatch(target, record, hash_it=True)
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

    def _resolve(
        self, paths: ModelPaths, revision: str, metadata: ModelMetadata
    ) -> tuple[str, dict[str, FileRecord]]:
        """The commit `revision` names and its files, from the Hub or (offline) the cache."""
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
        entry.resolved_at = layout.now()
        # The ref moves only once a snapshot of `commit` is complete (`ensure_model`): until
        # then offline runs keep using the previous commit, which is whole.
        layout.write_metadata(paths, metadata)
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

    def _plan(
        self, paths: ModelPaths, commit: str, files: dict[str, FileRecord], spec: RankSpec
    ) -> FilePlan:
        snapshot = paths.snapshot(commit)
        config = read_json(snapshot / CONFIG_FILE, what=CONFIG_FILE) or {}
        index = None
        if INDEX_FILE in files:
            index = read_json(snapshot / INDEX_FILE, what=INDEX_FILE)
            if index is None:
                raise CacheError(
                    f"{INDEX_FILE} of {paths.repo_id} is not in {snapshot}; run "
                    f"`mlxnode cache prewarm {paths.repo_id}` while online",
                    path=str(snapshot),
                )
        return plan_files(spec, repo_files=files, config=config, index=index, repo_id=paths.repo_id)

    # -- fetching files

    def _present(
        self, paths: ModelPaths, commit: str, name: str, record: FileRecord | None
    ) -> bool:
        try:
            size = paths.file(commit, name).stat().st_size
        except OSError:
            return False
        return record is None or record.size is None or size == record.size

    def _fetch(
        self,
        paths: ModelPaths,
        revision: str,
        commit: str,
        files: dict[str, FileRecord],
        names: list[str],
        *,
        force: bool,
    ) -> list[str]:
        """Download the `names` not yet in the snapshot (all with `force`); return them."""
        todo = [n for n in names if force or not self._present(paths, commit, n, files.get(n))]
        if not todo:
            return []
        if self.offline:
            # A file of the wrong size (cut short by a full disk or a bad copy) is named as such.
            damaged = [
                f"{name} ({size} bytes, expected {files[name].size})"
                for name in todo
                if (size := _size(paths.file(commit, name))) is not None
            ]
            absent = [name for name in todo if _size(paths.file(commit, name)) is None]
            found = ([f"{len(absent)} not cached: {', '.join(absent)}"] if absent else []) + (
                [f"{len(damaged)} of the wrong size: {', '.join(damaged)}"] if damaged else []
            )
            raise CacheError(
                f"offline mode is on and needed files of {paths.repo_id} in "
                f"{paths.snapshot(commit)} are unusable: {'; '.join(found)}; run `mlxnode cache "
                f"prewarm {paths.repo_id}` while online",
                path=str(paths.snapshot(commit)),
            )
        staging = paths.staging(commit)
        staging.mkdir(parents=True, exist_ok=True)
        _discard_incomplete(paths.root / layout.STAGING_DIR)
        needed = sum(files[n].size or 0 for n in todo)
        check_free_space(paths.root, needed, repo_id=paths.repo_id)
        logger.debug("fetching %d file(s), %s: %s", len(todo), format_bytes(needed), todo)
        progress = Progress(
            needed, label=f"{paths.repo_id} ({len(todo)} files)", enabled=self.progress
        )
        fetch_one = functools.partial(
            self._fetch_one, paths, revision, commit, force=force, progress=progress, needed=needed
        )
        ok = False
        try:
            with ThreadPoolExecutor(
                max_workers=min(MAX_WORKERS, len(todo)), thread_name_prefix="mlxnode-fetch"
            ) as pool:
                futures = [pool.submit(fetch_one, name, files[name]) for name in todo]
                try:
                    for future in as_completed(futures):
                        future.result()
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
            ok = True
        finally:
            progress.close(ok=ok)
        # Everything fetched is in the snapshot now; huggingface_hub's bookkeeping can go.
        shutil.rmtree(staging, ignore_errors=True)
        return todo

    def _fetch_one(
        self,
        paths: ModelPaths,
        revision: str,
        commit: str,
        name: str,
        record: FileRecord,
        *,
        force: bool,
        progress: Progress,
        needed: int,
    ) -> None:
        """Download one file into staging, verify size and hash, then move it into the snapshot."""
        from huggingface_hub import hf_hub_download

        staging = paths.staging(commit)
        target = paths.file(commit, name)
        refetch = [force]

        def attempt() -> Path:
            progress.restart(name)
            staged = Path(
                hf_hub_download(
                    paths.repo_id,
                    name,
                    revision=commit,
                    local_dir=staging,
                    token=self._token,
                    endpoint=self.endpoint,
                    force_download=refetch[0],
                    tqdm_class=progress.file_bar(name),
                )
            )
            problem = _mismatch(staged, record, hash_it=True)
            if problem is not None:
                staged.unlink(missing_ok=True)
                # Next time skip any copy huggingface_hub might reuse (its own cache).
                refetch[0] = True
                raise TransientError(f"downloaded {name} is wrong ({problem})")
            return staged

        staged = with_retries(
            attempt,
            what=f"{paths.repo_id}/{name}",
            max_retries=self.max_retries,
            backoff_base=self.backoff_base,
            describe=functools.partial(
                describe_error,
                repo_id=paths.repo_id,
                revision=revision,
                endpoint=self.endpoint,
                filename=name,
                disk=(paths.root, needed),
            ),
            download=True,
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)

    def _check(
        self,
        paths: ModelPaths,
        commit: str,
        files: dict[str, FileRecord],
        names: list[str],
        *,
        verify_hashes: bool,
    ) -> None:
        for name in names:
            target = paths.file(commit, name)
            problem = (
                "missing"
                if not target.is_file()
                else _mismatch(target, files.get(name), hash_it=verify_hashes)
            )
            if problem is not None:
                raise CacheError(
                    f"cached file {target} is {problem}; run `mlxnode cache prewarm "
                    f"{paths.repo_id} --force-download`",
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
        if refs.is_dir():
            for ref in sorted(refs.rglob("*")):
                if ref.is_file():
                    commit = paths.read_ref(ref.relative_to(refs).as_posix())
                    if commit is not None:
                        revisions.setdefault(commit, []).append(ref.relative_to(refs).as_posix())
        commits: list[CachedCommit] = []
        snapshots = paths.root / layout.SNAPSHOTS_DIR
        for snapshot in sorted(snapshots.iterdir()) if snapshots.is_dir() else []:
            if not layout.is_commit(snapshot.name):
                continue
            commit = snapshot.name
            files = metadata.commits.get(commit, layout.CommitRecord()).files
            try:
                expected = self._plan(paths, commit, files, RankSpec()).files
            except Exception:  # noqa: BLE001 - a half-cached model still gets listed
                expected = metadata_files(files)
            present = [f for f in expected if self._present(paths, commit, f, files.get(f))]
            complete = [
                p
                for p in metadata.commits.get(commit, layout.CommitRecord()).prewarmed
                if all(self._present(paths, commit, f, files.get(f)) for f in p.files)
            ]
            commits.append(
                CachedCommit(
                    commit=commit,
                    revisions=revisions.get(commit, []),
                    path=snapshot,
                    files_present=len(present),
                    files_expected=len(expected),
                    complete_for=complete,
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
    )


def hash_file(path: Path, *, git_blob: bool = False) -> tuple[str, str | None]:
    """sha256 of the file, and (with `git_blob`) its git blob sha1, in one read."""
    sha256 = hashlib.sha256()
    sha1 = None
    if git_blob:
        sha1 = hashlib.sha1(usedforsecurity=False)
        sha1.update(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            sha256.update(chunk)
            if sha1 is not None:
                sha1.update(chunk)
    return sha256.hexdigest(), None if sha1 is None else sha1.hexdigest()


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
    check_blob = not record.lfs and record.blob_id is not None
    sha256, blob = hash_file(path, git_blob=check_blob)
    if record.sha256 is not None and sha256 != record.sha256:
        return f"sha256 {sha256[:12]}..., expected {record.sha256[:12]}..."
    if check_blob and blob != record.blob_id:
        return f"git blob {blob[:12] if blob else '?'}..., expected {record.blob_id[:12]}..."
    if record.sha256 is None:
        record.sha256 = sha256
    return None


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _discard_incomplete(staging_root: Path) -> None:
    """Remove partial downloads a killed process left behind (we hold the model's lock).

    huggingface_hub 2.4.0 names them ``<file>.<etag>.<random>.incomplete``, per process, so
    they can never be resumed; keeping them would only waste space.
    """
    if not staging_root.is_dir():
        return
    for leftover in staging_root.rglob("*.incomplete"):
        try:
            logger.debug("discarding partial download %s", leftover)
            leftover.unlink()
        except OSError:
            pass
