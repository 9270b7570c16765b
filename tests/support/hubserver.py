"""A Hugging Face Hub look-alike HTTP server, for tests, benchmarks and the offline demo.

The real ``huggingface_hub`` client (``snapshot_download``, ``hf_hub_download``,
``HfApi.model_info``, ``list_repo_files``, ``get_paths_info``) talks to it once
``HF_ENDPOINT`` (or ``endpoint=``) points at `HubServer.endpoint`. Repos are plain
directories ``root/<org>/<name>/``; revision ``main`` and the repo's commit sha (a
deterministic sha1 over file names and contents) both resolve.

Endpoints served (``{rev}`` is ``main`` or the sha, URL-quoted)::

    GET|HEAD /api/models/{repo}[/revision/{rev}]    model_info, repo_info (?blobs=true)
    GET      /api/models/{repo}/tree/{rev}[/{path}]  list_repo_tree (?recursive, Link paging)
    POST     /api/models/{repo}/paths-info/{rev}     get_paths_info (form or JSON "paths")
    GET      /api/models/{repo}/refs                 list_repo_refs
    GET|HEAD /{repo}/resolve/{rev}/{path}            hf_hub_download (Range -> 206)

Files are answered directly (200, never a CDN redirect) with ``X-Repo-Commit`` and an
``ETag``; LFS files add ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``. The server
never sends Xet headers (``X-Xet-Hash``, ``xetHash``), so the client always downloads
over plain HTTP from this address and nowhere else. Unlike the Hub, where a gated
repo's metadata stays public, every endpoint of a gated repo needs the token.

Tests drive failures through `HubServer.faults` and check traffic through
`HubServer.stats`; a global byte rate stands in for an internet link in benchmarks.

Run it in the background for a script::

    python -m tests.support.hubserver --root DIR --rate-limit 20MB --port-file hub.port
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socketserver import TCPServer
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 0
DEFAULT_BRANCH = "main"
# Served as LFS files (sha256 etag, `lfs` metadata), like the Hub's default .gitattributes.
LFS_PATTERNS = ("*.safetensors",)
LFS_MIN_SIZE = 10 * 1024
# The Hub pages /tree listings at 1000 entries; the client follows the `Link: rel="next"` header.
TREE_PAGE_SIZE = 1000
# A repo directory holding this file answers 401/403 unless the request carries the server token.
GATED_MARKER = ".gated"
# Bodies go out in chunks of this size when no rate applies.
_CHUNK_SIZE = 256 * 1024
# Keep the per-request record list bounded for a long-running demo server; counters are not bounded.
_MAX_RECORDS = 100_000

FaultKind = Literal["status", "reset", "slow", "hang"]
FAULT_KINDS: tuple[str, ...] = ("status", "reset", "slow", "hang")

_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_RATE = re.compile(r"(?i)\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)(?:/s|ps)?\s*")


# --------------------------------------------------------------------------- repos on disk


@dataclass(frozen=True)
class _File:
    path: str  # posix path inside the repo
    source: Path
    size: int
    blob_id: str  # git blob sha1 of the content, or of the LFS pointer for LFS files
    lfs_sha256: str | None = None
    pointer_size: int | None = None

    @property
    def etag(self) -> str:
        return self.lfs_sha256 or self.blob_id

    def tree_entry(self) -> dict:
        entry: dict = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path}
        if self.lfs_sha256 is not None:
            entry["lfs"] = {
                "oid": self.lfs_sha256,
                "size": self.size,
                "pointerSize": self.pointer_size,
            }
        return entry


@dataclass(frozen=True)
class _Repo:
    repo_id: str
    sha: str
    gated: bool
    files: dict[str, _File]
    last_modified: float

    def resolve(self, revision: str | None) -> str | None:
        """Commit sha for `revision`, or None if the repo has no such revision."""
        if revision in (None, DEFAULT_BRANCH, f"refs/heads/{DEFAULT_BRANCH}", self.sha):
            return self.sha
        return None

    def folders(self) -> dict[str, str]:
        """Every folder path (not the root) mapped to a deterministic tree id."""
        children: dict[str, list[str]] = {}
        for file in self.files.values():
            parts = file.path.split("/")
            for depth in range(1, len(parts)):
                children.setdefault("/".join(parts[:depth]), []).append(file.etag)
        return {
            folder: _git_sha1(b"tree", "\n".join(sorted(etags)).encode())
            for folder, etags in children.items()
        }

    def tree(self, folder: str, *, recursive: bool) -> list[dict] | None:
        """Tree entries under `folder` ("" for the root), or None if it is not a folder."""
        folders = self.folders()
        if folder and folder not in folders:
            return None
        prefix = f"{folder}/" if folder else ""

        def wanted(path: str) -> bool:
            return path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])

        entries = [
            {"type": "directory", "oid": oid, "size": 0, "path": path}
            for path, oid in sorted(folders.items())
            if wanted(path)
        ]
        entries += [file.tree_entry() for path, file in self.files.items() if wanted(path)]
        return entries

    def path_info(self, path: str) -> dict | None:
        if path in self.files:
            return self.files[path].tree_entry()
        oid = self.folders().get(path)
        return None if oid is None else {"type": "directory", "oid": oid, "size": 0, "path": path}


def _git_sha1(kind: bytes, data: bytes) -> str:
    return hashlib.sha1(kind + b" %d\0" % len(data) + data).hexdigest()


def _is_lfs(path: str, size: int) -> bool:
    return size > LFS_MIN_SIZE or any(fnmatchcase(path.rsplit("/", 1)[-1], p) for p in LFS_PATTERNS)


class _RepoIndex:
    """Repos under `root`, rescanned on each lookup and rehashed only when a file changed."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._lock = threading.Lock()
        self._repos: dict[str, tuple[tuple, _Repo]] = {}
        self._digests: dict[tuple[str, int, int], _File] = {}

    def directory(self, repo_id: str) -> Path | None:
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(_REPO_PART.fullmatch(p) for p in parts):
            return None
        directory = self._root / parts[0] / parts[1]
        return directory if directory.is_dir() else None

    def get(self, repo_id: str) -> _Repo | None:
        directory = self.directory(repo_id)
        if directory is None:
            return None
        listing = sorted(self._walk(directory))
        gated = (directory / GATED_MARKER).is_file()
        signature = (gated, tuple((rel, st.st_size, st.st_mtime_ns) for rel, _, st in listing))
        # Hashing runs under the lock so concurrent first requests hash a large file once.
        with self._lock:
            cached = self._repos.get(repo_id)
            if cached is not None and cached[0] == signature:
                return cached[1]
            files = {rel: self._describe(rel, path, st) for rel, path, st in listing}
            commit = hashlib.sha1()
            for rel, file in files.items():
                commit.update(f"{rel}\0{file.etag}\n".encode())
            repo = _Repo(
                repo_id=repo_id,
                sha=commit.hexdigest(),
                gated=gated,
                files=files,
                last_modified=max((st.st_mtime for _, _, st in listing), default=0.0),
            )
            self._repos[repo_id] = (signature, repo)
            return repo

    @staticmethod
    def _walk(directory: Path) -> Iterator[tuple[str, Path, os.stat_result]]:
        for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
            rel_dir = Path(dirpath).relative_to(directory).as_posix()
            # Never publish a git checkout's internals or a local_dir download's metadata.
            dirnames[:] = sorted(
                d for d in dirnames if d != ".git" and not (rel_dir == "." and d == ".cache")
            )
            for name in filenames:
                if rel_dir == "." and name == GATED_MARKER:
                    continue
                path = Path(dirpath) / name
                try:
                    st = path.stat()
                except OSError:  # a dangling symlink is not a file of the repo
                    continue
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                yield rel, path, st

    def _describe(self, rel: str, path: Path, st: os.stat_result) -> _File:
        key = (str(path), st.st_size, st.st_mtime_ns)
        cached = self._digests.get(key)
        if cached is not None and cached.path == rel:
            return cached
        if _is_lfs(rel, st.st_size):
            sha256 = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    sha256.update(chunk)
            oid = sha256.hexdigest()
            pointer = (
                f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {st.st_size}\n"
            ).encode()
            file = _File(rel, path, st.st_size, _git_sha1(b"blob", pointer), oid, len(pointer))
        else:
            file = _File(rel, path, st.st_size, _git_sha1(b"blob", path.read_bytes()))
        self._digests[key] = file
        return file


# --------------------------------------------------------------------------- faults


@dataclass
class Fault:
    """One injected failure; see `FaultSet.add` for the meaning of each field."""

    path_glob: str
    kind: FaultKind
    times: int | None
    methods: frozenset[str]
    api: bool
    status: int = 503
    retry_after: int | None = None
    after_bytes: int | None = None
    rst: bool = False
    delay: float = 0.0
    bytes_per_s: float | None = None
    hits: int = 0

    def matches(self, method: str, path: str, *, is_api: bool) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if method not in self.methods or (is_api and not self.api):
            return False
        return fnmatchcase(path, self.path_glob)


class FaultSet:
    """Failures to inject, set at runtime from a test; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(
        self,
        path_glob: str,
        kind: FaultKind,
        *,
        times: int | None = 1,
        methods: Collection[str] = ("GET",),
        api: bool = False,
        status: int = 503,
        retry_after: int | None = None,
        after_bytes: int | None = None,
        rst: bool = False,
        delay: float | None = None,
        bytes_per_s: float | None = None,
    ) -> Fault:
        """Inject a failure into the next `times` matching requests.

        Args:
            path_glob: `fnmatch` pattern over the decoded URL path, e.g.
                ``"*/model-00001-of-00003.safetensors"`` or ``"/api/models/*"``
                (``*`` also matches ``/``).
            kind: ``status`` answers `status` (with ``Retry-After`` if `retry_after`);
                ``reset`` sends the headers and `after_bytes` of the body (default:
                half), then closes the connection, with a TCP RST if `rst` (a HEAD
                is dropped before any answer); ``slow``
                waits `delay` seconds before answering and/or sends the body at
                `bytes_per_s`; ``hang`` never answers until the server stops.
            times: How many requests the fault applies to; None for every request.
            methods: HTTP methods it applies to (``"GET"``, ``"HEAD"``, ``"POST"``).
            api: Also apply to ``/api/...`` requests; by default only file
                downloads (``/{repo}/resolve/...``) are affected.

        Returns:
            The `Fault`; its ``hits`` counts the requests it has affected.

        Raises:
            ValueError: For an unknown kind or a meaningless combination.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1, or None for every request")
        if kind == "slow" and delay is None and bytes_per_s is None:
            delay = 1.0
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError("bytes_per_s must be positive")
        fault = Fault(
            path_glob=path_glob,
            kind=kind,
            times=times,
            methods=frozenset(m.upper() for m in methods),
            api=api,
            status=status,
            retry_after=retry_after,
            after_bytes=after_bytes,
            rst=rst,
            delay=delay or 0.0,
            bytes_per_s=bytes_per_s,
        )
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        """Remove every fault."""
        with self._lock:
            self._faults.clear()

    def __iter__(self) -> Iterator[Fault]:
        with self._lock:
            return iter(list(self._faults))

    def __len__(self) -> int:
        with self._lock:
            return len(self._faults)

    def _take(self, method: str, path: str, *, is_api: bool) -> Fault | None:
        """The first fault matching this request, with one of its uses consumed."""
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path, is_api=is_api):
                    fault.hits += 1
                    return fault
        return None


# --------------------------------------------------------------------------- stats


@dataclass
class RequestRecord:
    """One request as the server saw it.

    Recorded when the request arrives and updated before each write, so whatever
    the client has received is already counted when a test looks.
    """

    method: str
    path: str  # decoded URL path, without the query
    file: str | None  # "org/name/path/in/repo" for file downloads
    range: str | None  # the Range header, if any
    fault: str | None  # the fault kind applied, if any
    status: int | None = None  # None until answered; stays None for hang and dropped HEADs
    body_bytes: int = 0  # body bytes handed to the socket (HEAD: 0)
    duration_s: float | None = None  # None while in flight


class RequestStats:
    """Thread-safe counts of requests and of file body bytes sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget everything counted so far."""
        with self._lock:
            self._requests: Counter[tuple[str, str]] = Counter()
            self._file_requests: Counter[tuple[str, str]] = Counter()
            self._file_bytes: Counter[str] = Counter()
            self._records: deque[RequestRecord] = deque(maxlen=_MAX_RECORDS)

    @property
    def bytes_sent(self) -> int:
        """File body bytes sent so far, over all files (API and error bodies excluded)."""
        with self._lock:
            return sum(self._file_bytes.values())

    @property
    def requests(self) -> dict[tuple[str, str], int]:
        """Requests per (method, decoded path)."""
        with self._lock:
            return dict(self._requests)

    @property
    def records(self) -> list[RequestRecord]:
        """Copies of the request records, oldest first (the last 100 000)."""
        with self._lock:
            return [replace(record) for record in self._records]

    def count(self, path_glob: str = "*", *, method: str | None = None) -> int:
        """Requests whose decoded path matches `path_glob` (and `method`, if given)."""
        with self._lock:
            return sum(
                n
                for (m, path), n in self._requests.items()
                if (method is None or m == method) and fnmatchcase(path, path_glob)
            )

    def file_gets(self, pattern: str = "*") -> int:
        """GET requests for files matching `pattern` over ``"org/name/path/in/repo"``."""
        return self._file_count("GET", pattern)

    def file_heads(self, pattern: str = "*") -> int:
        """HEAD requests for files matching `pattern` over ``"org/name/path/in/repo"``."""
        return self._file_count("HEAD", pattern)

    def file_bytes(self, pattern: str = "*") -> int:
        """Body bytes sent for files matching `pattern` over ``"org/name/path/in/repo"``."""
        with self._lock:
            return sum(n for key, n in self._file_bytes.items() if fnmatchcase(key, pattern))

    def _file_count(self, method: str, pattern: str) -> int:
        with self._lock:
            return sum(
                n
                for (m, key), n in self._file_requests.items()
                if m == method and fnmatchcase(key, pattern)
            )

    def _begin(self, record: RequestRecord) -> RequestRecord:
        with self._lock:
            self._requests[(record.method, record.path)] += 1
            if record.file is not None:
                self._file_requests[(record.method, record.file)] += 1
            self._records.append(record)
        return record

    def _answer(self, record: RequestRecord, status: int) -> None:
        with self._lock:
            record.status = status

    def _add_bytes(self, record: RequestRecord, n: int, *, file_body: bool) -> None:
        with self._lock:
            record.body_bytes += n
            if file_body and record.file is not None:
                self._file_bytes[record.file] += n

    def _end(self, record: RequestRecord, duration_s: float) -> None:
        with self._lock:
            record.duration_s = duration_s


# --------------------------------------------------------------------------- rate limiting


class _Throttle:
    """Paces bytes to `rate` per second across every caller sharing the instance.

    Each chunk reserves the next slot on a virtual clock, so concurrent connections
    share the link fairly and the aggregate never exceeds the rate.
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.chunk_size = int(min(_CHUNK_SIZE, max(1024, rate / 50)))
        self._lock = threading.Lock()
        self._next = 0.0

    def wait(self, nbytes: int, stop: threading.Event) -> bool:
        """Block until `nbytes` may go out; False if the server is stopping."""
        with self._lock:
            start = max(time.monotonic(), self._next)
            self._next = start + nbytes / self.rate
            until = self._next
        delay = until - time.monotonic()
        return not stop.wait(delay) if delay > 0 else not stop.is_set()


def parse_rate(text: str) -> float:
    """Bytes per second from ``"20MB"``, ``"20MB/s"``, ``"512KiB"``, ``"1e6"`` or ``"800000"``.

    Decimal prefixes (k, M, G, T) are powers of 1000, binary ones (Ki, Mi, ...) of 1024.

    Raises:
        ValueError: If the text is not a positive rate.
    """
    match = _RATE.fullmatch(text)
    try:
        value = float(text) if match is None else float(match.group(1))
    except ValueError:
        raise ValueError(f"not a byte rate: {text!r} (try 20MB, 512KiB or 1000000)") from None
    if match is not None and match.group(2):
        base = 1024 if match.group(3) else 1000
        value *= base ** ("kmgt".index(match.group(2).lower()) + 1)
    if value <= 0:
        raise ValueError(f"rate must be positive: {text!r}")
    return value


# --------------------------------------------------------------------------- HTTP


@dataclass
class _Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    file: _File | None = None
    start: int = 0
    length: int = 0  # body length; for a file, the bytes of it to send from `start`


@dataclass(frozen=True)
class _Route:
    kind: Literal["info", "tree", "paths-info", "refs", "resolve", "unknown"]
    repo_id: str = ""
    revision: str | None = None
    path: str = ""

    @property
    def is_api(self) -> bool:
        return self.kind != "resolve"


def _route(raw_path: str) -> _Route:
    """Which endpoint a still-quoted URL path names (revisions come quoted with ``safe=""``)."""
    parts = raw_path.split("/")
    if len(parts) >= 5 and parts[1:3] == ["api", "models"]:
        repo_id = f"{unquote(parts[3])}/{unquote(parts[4])}"
        rest = parts[5:]
        if not rest or rest == [""]:
            return _Route("info", repo_id)
        if rest[0] == "revision" and len(rest) == 2:
            return _Route("info", repo_id, unquote(rest[1]))
        if rest[0] == "tree" and len(rest) >= 2:
            return _Route("tree", repo_id, unquote(rest[1]), unquote("/".join(rest[2:])).strip("/"))
        if rest[0] == "paths-info" and len(rest) == 2:
            return _Route("paths-info", repo_id, unquote(rest[1]))
        if rest[0] == "refs" and len(rest) == 1:
            return _Route("refs", repo_id)
    elif len(parts) >= 6 and parts[3] == "resolve" and parts[1] != "api":
        repo_id = f"{unquote(parts[1])}/{unquote(parts[2])}"
        return _Route("resolve", repo_id, unquote(parts[4]), unquote("/".join(parts[5:])))
    return _Route("unknown")


def _json(data: object, status: int = 200, **headers: str) -> _Response:
    body = json.dumps(data).encode()
    return _Response(
        status,
        {"Content-Type": "application/json; charset=utf-8", **headers},
        body,
        length=len(body),
    )


def _error(
    status: int, message: str, code: str | None = None, commit: str | None = None
) -> _Response:
    """An error the client maps to an exception class through ``X-Error-Code``."""
    headers: dict[str, str] = {}
    if code is not None:
        headers["X-Error-Code"] = code
        headers["X-Error-Message"] = message
    if commit is not None:
        headers["X-Repo-Commit"] = commit
    return _json({"error": message}, status, **headers)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _truthy(values: list[str] | None) -> bool:
    return bool(values) and values[-1].lower() in ("1", "true", "yes")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mlxnode-hubserver"
    # Idle keep-alive connections are dropped after this long.
    timeout = 300
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, add=True)

    def finish(self) -> None:
        try:
            with contextlib.suppress(OSError):
                super().finish()
        finally:
            self.server.track(self.connection, add=False)

    def do_GET(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler's naming
        self._handle("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # one line per request is written by `_handle`, once the body is out

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        logger.debug("%s %s", self.address_string(), format % args)

    # -- request flow

    def _handle(self, method: str) -> None:
        hub = self.server.hub
        started = time.monotonic()
        url = urlsplit(self.path)
        path = unquote(url.path)
        route = _route(url.path)
        # Read a POST body first: the connection stays usable whatever the answer.
        body = (
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if method == "POST"
            else b""
        )
        fault = hub.faults._take(method, path, is_api=route.is_api)
        record = hub.stats._begin(
            RequestRecord(
                method=method,
                path=path,
                file=f"{route.repo_id}/{route.path}" if route.kind == "resolve" else None,
                range=self.headers.get("Range"),
                fault=None if fault is None else fault.kind,
            )
        )
        try:
            if fault is not None and fault.kind == "hang":
                self.close_connection = True
                hub._stopping.wait()
                return
            if fault is not None and fault.delay and hub._stopping.wait(fault.delay):
                self.close_connection = True
                return
            if fault is not None and fault.kind == "reset" and method == "HEAD":
                self._abort(rst=fault.rst)  # no body to cut: drop the request unanswered
                return
            if fault is not None and fault.kind == "status":
                response = self._fault_response(fault)
            else:
                try:
                    response = self._dispatch(method, route, parse_qs(url.query), body)
                except Exception:  # noqa: BLE001 - a server bug must still answer
                    logger.exception("%s %s failed", method, self.path)
                    response = _error(500, "Internal error in the test Hub server")
            self._send(method, response, fault, record)
        except OSError as e:  # the client went away mid-answer
            logger.debug("%s %s: connection lost: %s", method, self.path, e)
            self.close_connection = True
        finally:
            duration = time.monotonic() - started
            hub.stats._end(record, duration)
            logger.info(
                '%s "%s %s" %s %dB %.3fs%s',
                self.client_address[0],
                method,
                self.path,
                record.status if record.status is not None else "-",
                record.body_bytes,
                duration,
                f" fault={fault.kind}" if fault is not None else "",
            )

    def _fault_response(self, fault: Fault) -> _Response:
        message = f"Injected fault: HTTP {fault.status}"
        response = _json({"error": message}, fault.status)
        if fault.retry_after is not None:
            response.headers["Retry-After"] = str(fault.retry_after)
        return response

    def _dispatch(self, method: str, route: _Route, query: dict, body: bytes) -> _Response:
        if route.kind == "unknown":
            return _error(404, f"Not found: {self.path}")
        allowed = ("POST",) if route.kind == "paths-info" else ("GET", "HEAD")
        if method not in allowed:
            return _error(405, f"Method {method} not allowed here")
        repo = self.server.hub._index.get(route.repo_id)
        if repo is None:
            return _error(404, f"Repository {route.repo_id} not found", "RepoNotFound")
        denied = self._check_access(repo)
        if denied is not None:
            return denied
        if route.kind == "refs":
            branch = {
                "name": DEFAULT_BRANCH,
                "ref": f"refs/heads/{DEFAULT_BRANCH}",
                "targetCommit": repo.sha,
            }
            refs = {"branches": [branch], "converts": [], "tags": []}
            if _truthy(query.get("include_prs")):
                refs["pullRequests"] = []
            return _json(refs)
        commit = repo.resolve(route.revision)
        if commit is None:
            return _error(404, f"Invalid rev id: {route.revision}", "RevisionNotFound")
        if route.kind == "info":
            return _json(self._model_info(repo, blobs=_truthy(query.get("blobs"))))
        if route.kind == "tree":
            return self._tree(repo, route, query)
        if route.kind == "paths-info":
            return self._paths_info(repo, body)
        return self._resolve(repo, route.path)

    def _check_access(self, repo: _Repo) -> _Response | None:
        if not repo.gated:
            return None
        auth = self.headers.get("Authorization", "")
        token = self.server.hub.token
        if not auth.lower().startswith("bearer "):
            return _error(
                401,
                f"Access to model {repo.repo_id} is restricted. You must have access to it"
                " and be authenticated to access it. Please log in.",
                "GatedRepo",
            )
        if token is None or auth[len("bearer ") :].strip() != token:
            return _error(
                403,
                f"Access to model {repo.repo_id} is restricted and you are not in the"
                " authorized list.",
                "GatedRepo",
            )
        return None

    def _model_info(self, repo: _Repo, *, blobs: bool) -> dict:
        siblings = []
        for file in repo.files.values():
            sibling: dict = {"rfilename": file.path}
            if blobs:
                sibling.update(size=file.size, blobId=file.blob_id)
                if file.lfs_sha256 is not None:
                    sibling["lfs"] = {
                        "sha256": file.lfs_sha256,
                        "size": file.size,
                        "pointerSize": file.pointer_size,
                    }
            siblings.append(sibling)
        org = repo.repo_id.split("/")[0]
        return {
            "_id": repo.sha[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": org,
            "sha": repo.sha,
            "lastModified": _iso(repo.last_modified),
            "createdAt": _iso(repo.last_modified),
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(f.size for f in repo.files.values()),
        }

    def _tree(self, repo: _Repo, route: _Route, query: dict) -> _Response:
        entries = repo.tree(route.path, recursive=_truthy(query.get("recursive")))
        if entries is None:
            return _error(404, f"Entry not found: {route.path}", "EntryNotFound", repo.sha)
        page_size = self.server.hub.tree_page_size
        cursor = int((query.get("cursor") or ["0"])[-1] or 0)
        page = entries[cursor : cursor + page_size]
        headers: dict[str, str] = {}
        if cursor + page_size < len(entries):
            # The client follows an absolute "next" URL that already carries the query.
            host = self.headers.get("Host") or self.server.hub.url.split("//", 1)[1]
            recursive = "true" if _truthy(query.get("recursive")) else "false"
            next_url = (
                f"http://{host}{urlsplit(self.path).path}"
                f"?recursive={recursive}&expand=false&cursor={cursor + page_size}"
            )
            headers["Link"] = f'<{next_url}>; rel="next"'
        return _json(page, **headers)

    def _paths_info(self, repo: _Repo, body: bytes) -> _Response:
        content_type = self.headers.get("Content-Type", "")
        if "json" in content_type:
            paths = json.loads(body or b"{}").get("paths", [])
            paths = [paths] if isinstance(paths, str) else paths
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        # Like the Hub, paths that do not exist are left out rather than failing the call.
        infos = [info for p in paths if (info := repo.path_info(p.strip("/"))) is not None]
        return _json(infos)

    def _resolve(self, repo: _Repo, path: str) -> _Response:
        file = repo.files.get(path)
        if file is None:
            return _error(404, f"Entry not found: {path}", "EntryNotFound", repo.sha)
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{file.etag}"',
            "X-Repo-Commit": repo.sha,
        }
        if file.lfs_sha256 is not None:
            headers["X-Linked-Etag"] = f'"{file.lfs_sha256}"'
            headers["X-Linked-Size"] = str(file.size)
        start, length, status = 0, file.size, 200
        requested = self.headers.get("Range")
        if requested:
            span = _parse_range(requested, file.size)
            if span == "unsatisfiable":
                response = _error(416, f"Range not satisfiable: {requested}", commit=repo.sha)
                response.headers["Content-Range"] = f"bytes */{file.size}"
                return response
            if span is not None:
                start, end = span
                length, status = end - start + 1, 206
                headers["Content-Range"] = f"bytes {start}-{end}/{file.size}"
        return _Response(status, headers, file=file, start=start, length=length)

    # -- writing

    def _send(
        self, method: str, response: _Response, fault: Fault | None, record: RequestRecord
    ) -> None:
        stats = self.server.hub.stats
        stats._answer(record, response.status)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(response.length))
        self.end_headers()
        if method == "HEAD":
            return
        cut = None
        if fault is not None and fault.kind == "reset":
            cut = fault.after_bytes if fault.after_bytes is not None else response.length // 2
        self._send_body(response, fault, record, cut)
        if cut is not None:
            self._abort(rst=fault is not None and fault.rst)

    def _send_body(
        self, response: _Response, fault: Fault | None, record: RequestRecord, cut: int | None
    ) -> None:
        hub = self.server.hub
        throttles = [t for t in (hub._throttle,) if t is not None]
        if fault is not None and fault.bytes_per_s is not None:
            throttles.append(_Throttle(fault.bytes_per_s))
        chunk_size = min([_CHUNK_SIZE, *(t.chunk_size for t in throttles)])
        limit = response.length if cut is None else min(cut, response.length)
        sent = 0
        for chunk in self._chunks(response, limit, chunk_size):
            for throttle in throttles:
                if not throttle.wait(len(chunk), hub._stopping):
                    self.close_connection = True
                    return
            # Counted before the write so a client never sees bytes the stats do not.
            hub.stats._add_bytes(record, len(chunk), file_body=response.file is not None)
            self.wfile.write(chunk)
            sent += len(chunk)
        if sent < response.length:
            self.close_connection = True

    @staticmethod
    def _chunks(response: _Response, limit: int, chunk_size: int) -> Iterator[bytes]:
        if response.file is None:
            for offset in range(0, limit, chunk_size):
                yield response.body[offset : min(offset + chunk_size, limit)]
            return
        with response.file.source.open("rb") as f:
            f.seek(response.start)
            remaining = limit
            while remaining > 0 and (chunk := f.read(min(chunk_size, remaining))):
                remaining -= len(chunk)
                yield chunk

    def _abort(self, *, rst: bool) -> None:
        """End the connection mid-body: a plain close (FIN) or, with `rst`, a TCP reset."""
        self.close_connection = True
        if rst:
            # SO_LINGER 0 makes close() send RST; closing now skips the FIN of shutdown().
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()


def _parse_range(header: str, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """Inclusive byte span of a single-range header; None to ignore it and send everything."""
    match = _RANGE.fullmatch(header.strip())
    if match is None or not (match.group(1) or match.group(2)):
        return None
    if match.group(1):
        start = int(match.group(1))
        end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
        if start >= size or end < start:
            return "unsatisfiable"
        return start, end
    suffix = int(match.group(2))
    if suffix == 0 or size == 0:
        return "unsatisfiable"
    return max(0, size - suffix), size - 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], hub: HubServer) -> None:
        self.hub = hub
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN; skip it so nothing leaves for DNS.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def track(self, connection: socket.socket, *, add: bool) -> None:
        with self._connections_lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def drop_connections(self) -> None:
        """Unblock handler threads waiting on idle keep-alive connections."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class HubServer:
    """A Hub-compatible HTTP server over a directory of repos.

    Args:
        root: Directory holding repos as ``root/<org>/<name>/``.
        host: Address to bind.
        port: Port to bind; 0 picks a free one (see `port` once started).
        rate_limit_bytes_per_s: Pace every response body to this aggregate rate,
            shared across connections; None for no limit.
        token: The only bearer token accepted for gated repos (those holding a
            ``.gated`` file).

    Use as a context manager, or call `start` and `stop`::

        with HubServer(tmp_path / "hub") as hub:
            snapshot_download("acme/tiny", endpoint=hub.endpoint, cache_dir=...)
            assert hub.stats.file_gets("acme/tiny/*.safetensors") == 3
    """

    def __init__(
        self,
        root: Path,
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        rate_limit_bytes_per_s: float | None = None,
        token: str | None = None,
    ) -> None:
        if rate_limit_bytes_per_s is not None and rate_limit_bytes_per_s <= 0:
            raise ValueError("rate_limit_bytes_per_s must be positive, or None for no limit")
        self.root = Path(root)
        self.host = host
        self.token = token
        self.rate_limit_bytes_per_s = rate_limit_bytes_per_s
        self.tree_page_size = TREE_PAGE_SIZE
        self.faults = FaultSet()
        self.stats = RequestStats()
        self._requested_port = port
        self._index = _RepoIndex(self.root)
        self._throttle = (
            None if rate_limit_bytes_per_s is None else _Throttle(rate_limit_bytes_per_s)
        )
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("HubServer is not started; call start() first")
        return self._server.server_port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def endpoint(self) -> str:
        """The value for ``HF_ENDPOINT`` or ``endpoint=`` (same as `url`)."""
        return self.url

    def commit_sha(self, repo_id: str) -> str:
        """The commit sha ``main`` resolves to for `repo_id`.

        Raises:
            KeyError: If there is no such repo under `root`.
        """
        repo = self._index.get(repo_id)
        if repo is None:
            raise KeyError(f"no repo {repo_id!r} under {self.root}")
        return repo.sha

    def start(self) -> HubServer:
        """Bind and serve in a background thread; returns self."""
        if self._server is not None:
            return self
        self._stopping.clear()
        # Hash every repo now: the client's 10 s HEAD timeout is shorter than hashing
        # many GB of weights on the first request.
        for directory in sorted(self.root.glob("*/*")):
            self._index.get(f"{directory.parent.name}/{directory.name}")
        self._server = _Server((self.host, self._requested_port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"hubserver:{self._server.server_port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; hung and slow requests are released and connections closed."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.drop_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- CLI


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.hubserver",
        description="Serve a directory of model repos as a Hugging Face Hub endpoint.",
    )
    parser.add_argument("--root", type=Path, required=True, help="directory of <org>/<name>/ repos")
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})"
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port to bind; 0 picks a free one (default)"
    )
    parser.add_argument(
        "--rate-limit",
        type=parse_rate,
        metavar="RATE",
        help="aggregate body rate such as 20MB (/s implied) or 512KiB; default unlimited",
    )
    parser.add_argument(
        "--token-file", type=Path, help="file holding the token that unlocks gated repos"
    )
    parser.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; one log line per request on stderr."""
    args = setup_arg_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    if not args.root.is_dir():
        print(f"hubserver: error: --root {args.root} is not a directory", file=sys.stderr)
        return 2
    token = None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip() or None
        except OSError as e:
            print(f"hubserver: error: cannot read --token-file: {e}", file=sys.stderr)
            return 2

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if args.port_file is not None:
        # A stale file from an earlier run must not be mistaken for this one.
        args.port_file.unlink(missing_ok=True)
    try:
        with HubServer(
            args.root,
            host=args.host,
            port=args.port,
            rate_limit_bytes_per_s=args.rate_limit,
            token=token,
        ) as server:
            if args.port_file is not None:
                tmp = args.port_file.with_name(f".{args.port_file.name}.tmp")
                tmp.write_text(f"{server.port}\n")
                os.replace(tmp, args.port_file)
            logger.info(
                "serving %s at %s (rate limit: %s)",
                args.root,
                server.url,
                f"{args.rate_limit:.0f} B/s" if args.rate_limit else "none",
            )
            while not stop.wait(0.5):
                pass
            logger.info("stopping")
    except OSError as e:
        print(f"hubserver: error: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    finally:
        if args.port_file is not None:
            args.port_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
