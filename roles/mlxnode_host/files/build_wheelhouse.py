#!/usr/bin/env python3
"""Build (once) a wheelhouse of mlxnode and all its dependencies for one target platform.

Runs on the controller. The dependency wheels are keyed by everything that decides
them (pyproject.toml, the requirement, the target's Python and platform tags), so a
second run with the same inputs downloads nothing; the mlxnode wheel itself is
rebuilt only when its source changes. Prints one JSON object:

    {"changed": bool, "dir": ..., "key": ..., "requirement": ..., "mlxnode_wheel": ...,
     "manifest_sha256": ..., "files": N, "bytes": N}

Hosts then install with `pip install --no-index --find-links DIR -r DIR/requirements.lock`.
"""

from __future__ import annotations

import argparse
import email.parser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MANIFEST = "manifest.json"
LOCK = "requirements.lock"
FORMAT_VERSION = 1
_SKIP_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache"}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_hash(src: Path) -> str:
    """Hash of what goes into the mlxnode wheel: pyproject, README and the package."""
    digest = hashlib.sha256()
    files = [src / "pyproject.toml", src / "README.md"]
    for root, dirs, names in os.walk(src / "mlxnode"):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        files += [Path(root) / n for n in sorted(names) if not n.endswith((".pyc", ".pyo"))]
    for path in files:
        if path.is_file():
            digest.update(str(path.relative_to(src)).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def deps_key(
    pyproject: bytes, requirement: str, extras: list[str], python: str, platforms: list[str]
) -> str:
    payload = json.dumps(
        {
            "format": FORMAT_VERSION,
            "pyproject": hashlib.sha256(pyproject).hexdigest(),
            "requirement": requirement,
            "extras": sorted(extras),
            "python": python,
            "platforms": sorted(set(platforms)),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _wheel_metadata(path: Path) -> tuple[str, str]:
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.HeaderParser().parsestr(zf.read(name).decode("utf-8"))
    return meta["Name"], meta["Version"]


def _run(argv: list[str], *, quiet: bool = False) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        if not quiet:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"build_wheelhouse: command failed ({proc.returncode}): {' '.join(argv)}")


def build_mlxnode_wheel(python: str, src: Path, out: Path) -> Path:
    """Build the mlxnode wheel from `src` into `out` (no dependencies)."""
    out.mkdir(parents=True, exist_ok=True)
    base = [python, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out)]
    try:
        # The controller's own setuptools is enough and needs no index.
        _run(base + ["--no-build-isolation", str(src)], quiet=True)
    except SystemExit:
        _run(base + [str(src)])
    wheels = sorted(out.glob("mlxnode-*.whl"))
    if not wheels:
        raise SystemExit(f"build_wheelhouse: pip built no mlxnode wheel from {src}")
    return wheels[-1]


def download_deps(
    python: str,
    wheel: Path,
    requirement: str,
    extras: list[str],
    target_python: str,
    platforms: list[str],
    out: Path,
) -> None:
    """Download binary wheels of every dependency for the target platform into `out`."""
    name, version = _wheel_metadata(wheel)
    spec = re.sub(r"^mlxnode", "", requirement)  # keep the extras, pin the built version
    abi = "cp" + target_python.replace(".", "")
    argv = [
        python,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--dest",
        str(out),
        "--find-links",
        str(wheel.parent),
        "--only-binary=:all:",
        "--implementation",
        "cp",
        "--python-version",
        target_python,
        "--abi",
        abi,
        "--abi",
        "abi3",
        "--abi",
        "none",
    ]
    for platform in sorted(set(platforms)):
        argv += ["--platform", platform]
    argv += [f"{name}{spec}=={version}", *extras]
    _run(argv)


def marker_only_deps(src: Path, requirement: str, target_env: dict[str, str]) -> list[str]:
    """mlxnode's dependencies that apply on the target but not here.

    pip evaluates environment markers against the Python running it, even with
    --platform, so a Linux controller would drop `mlx; sys_platform == 'darwin'`
    from a macOS wheelhouse. These are passed to pip explicitly instead.
    """
    try:
        import tomllib

        from packaging.markers import default_environment
        from packaging.requirements import Requirement
    except ImportError:
        return []
    project = tomllib.loads((src / "pyproject.toml").read_text())["project"]
    extras = set(Requirement(requirement).extras)
    specs = list(project.get("dependencies", []))
    for extra in extras:
        specs += project.get("optional-dependencies", {}).get(extra, [])
    here = default_environment()
    there = {**here, **target_env}
    added = []
    for spec in specs:
        req = Requirement(spec)
        if req.marker is None:
            continue
        if req.marker.evaluate(there) and not req.marker.evaluate(here):
            req.marker = None
            added.append(str(req))
    return added


def write_lock(directory: Path) -> tuple[list[str], str]:
    """requirements.lock pinning every wheel in `directory`; returns (lines, mlxnode wheel)."""
    lines, mlxnode_wheel = [], ""
    for wheel in sorted(directory.glob("*.whl")):
        name, version = _wheel_metadata(wheel)
        lines.append(f"{name}=={version}")
        if name.lower() == "mlxnode":
            mlxnode_wheel = wheel.name
    (directory / LOCK).write_text("\n".join(lines) + "\n")
    return lines, mlxnode_wheel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, type=Path, help="mlxnode source tree")
    parser.add_argument("--root", required=True, type=Path, help="where wheelhouses live")
    parser.add_argument("--requirement", default="mlxnode", help="e.g. mlxnode[cpu]")
    parser.add_argument("--extra", action="append", default=[], help="another requirement")
    parser.add_argument("--python-version", required=True, help="target Python, e.g. 3.11")
    parser.add_argument("--platform", action="append", required=True, help="target platform tag")
    parser.add_argument("--pip-python", default=sys.executable, help="Python that runs pip")
    parser.add_argument(
        "--target-system", default="", help="target platform.system(): Darwin or Linux"
    )
    parser.add_argument(
        "--target-machine", default="", help="target platform.machine(), e.g. arm64"
    )
    parser.add_argument(
        "--mlxnode-only",
        action="store_true",
        help="only the mlxnode wheel; hosts fetch the rest from their index",
    )
    args = parser.parse_args(argv)
    if args.target_system:
        target_env = {
            "sys_platform": {"Darwin": "darwin", "Linux": "linux"}.get(
                args.target_system, args.target_system.lower()
            ),
            "platform_system": args.target_system,
        }
        if args.target_machine:
            target_env["platform_machine"] = args.target_machine
        args.extra = args.extra + marker_only_deps(args.src, args.requirement, target_env)

    src = args.src.resolve()
    key = deps_key(
        (src / "pyproject.toml").read_bytes(),
        args.requirement + (" (mlxnode only)" if args.mlxnode_only else ""),
        args.extra,
        args.python_version,
        args.platform,
    )
    args.root.mkdir(parents=True, exist_ok=True)
    src_sha = source_hash(src)
    # One directory per (dependencies, mlxnode source): runs with different sources (two
    # checkouts, a test next to a developer) never swap each other's mlxnode wheel.
    directory = args.root / f"{key}-{src_sha[:12]}"
    manifest_path = directory / MANIFEST
    changed = False
    if not manifest_path.is_file():
        deps = ensure_deps(args, key, src)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=args.root))
        try:
            for wheel in deps.glob("*.whl"):
                _link_or_copy(wheel, staging / wheel.name)
            build_mlxnode_wheel(args.pip_python, src, staging)
            write_manifest(staging, args, key, src_sha)
            try:
                staging.rename(directory)
                changed = True
            except OSError:
                if not manifest_path.is_file():  # not a concurrent twin: a real failure
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        prune(args.root, key, keep=directory)

    manifest = json.loads(manifest_path.read_text())
    files = list(directory.glob("*.whl"))
    print(
        json.dumps(
            {
                "changed": changed,
                "dir": str(directory),
                "key": key,
                "requirement": args.requirement,
                "mlxnode_wheel": manifest["mlxnode_wheel"],
                "manifest_sha256": _sha256_file(manifest_path),
                "files": len(files),
                "bytes": sum(p.stat().st_size for p in files),
            }
        )
    )
    return 0


def ensure_deps(args: argparse.Namespace, key: str, src: Path) -> Path:
    """The dependency wheels for `key`, downloaded once and shared by every source."""
    deps = args.root / f"deps-{key}"
    if (deps / ".complete").is_file():
        return deps
    staging = Path(tempfile.mkdtemp(prefix=f".deps-{key}-", dir=args.root))
    try:
        wheel = build_mlxnode_wheel(args.pip_python, src, staging)
        if not args.mlxnode_only:
            download_deps(
                args.pip_python,
                wheel,
                args.requirement,
                args.extra,
                args.python_version,
                args.platform,
                staging,
            )
        for built in staging.glob("mlxnode-*.whl"):
            built.unlink()
        (staging / ".complete").touch()
        if deps.exists():
            shutil.rmtree(deps)
        try:
            staging.rename(deps)
        except OSError:
            if not (deps / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return deps


def write_manifest(directory: Path, args: argparse.Namespace, key: str, src_sha: str) -> None:
    lock, mlxnode_wheel = write_lock(directory)
    files = sorted(p.name for p in directory.glob("*.whl"))
    manifest = {
        "format": FORMAT_VERSION,
        "key": key,
        "requirement": args.requirement,
        "extras": args.extra,
        "python_version": args.python_version,
        "platforms": sorted(set(args.platform)),
        "source_sha256": src_sha,
        "mlxnode_wheel": mlxnode_wheel,
        "mlxnode_wheel_sha256": _sha256_file(directory / mlxnode_wheel),
        "lock": lock,
        "files": {name: _sha256_file(directory / name) for name in files},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def prune(root: Path, key: str, *, keep: Path, count: int = 3) -> None:
    """Keep the `count` newest wheelhouses of this dependency set (they are mostly hard links)."""
    houses = sorted(
        (d for d in root.glob(f"{key}-*") if d.is_dir() and d != keep),
        key=lambda d: d.stat().st_mtime,
        reverse=True,
    )
    for old in houses[count - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


if __name__ == "__main__":
    sys.exit(main())
