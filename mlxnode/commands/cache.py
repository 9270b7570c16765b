"""`mlxnode cache ...`: inspect, fill and clean the model cache.

Every action prints its answer on stdout (``--json`` for machines: Ansible reads
``changed`` from ``prewarm --json``) and raises mlxnode errors for `cli` to turn into
one stderr line and an exit code.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from ..cache import LocalModel, ModelCacheManager, RankSpec, local_model
from ..cache.layout import ModelPaths, is_commit, validate_repo_id
from ..config import DEFAULT_REVISION, ResolvedConfig
from ..errors import CacheError, UsageError
from ..formatting import format_bytes, format_table
from .common import HelpFormatter, add_config_flags, configure, examples

ACTIONS = {
    "list": "List cached models and which ranks each is complete for.",
    "size": "Print the bytes a model (or the whole cache) uses on disk.",
    "clear": "Delete one cached model (MODEL, --model or model.name), or --all of them.",
    "prewarm": "Download exactly the files given ranks need.",
    "verify": "Re-hash cached files and report missing or corrupt ones; by default for the "
    "ranks the model was prewarmed for.",
}

# The settings each action reads, and only those: `--step-timeout` means nothing to
# `cache size`. `--offline` is on every action: a promise that holds for each (list,
# size, clear and verify never contact the Hub), so scripts can pass it throughout.
_LOGGING = ("logging.level", "logging.file")
_LAYOUT = ("distributed.strategy", "distributed.split", "distributed.weights")
_HUB = ("cache.force_download", "cache.max_retries", "cache.backoff_base", "cache.lock_timeout")
ACTION_KEYS: dict[str, tuple[str, ...]] = {
    "list": ("cache.dir", "cache.offline", *_LOGGING),
    "size": ("cache.dir", "cache.offline", *_LOGGING),
    "clear": (
        "model.name", "model.path", "cache.dir", "cache.offline", "cache.lock_timeout", *_LOGGING
    ),
    "prewarm": (
        "model.name", "model.path", "model.revision", "cache.dir", "cache.offline", *_HUB,
        *_LOGGING, *_LAYOUT,
    ),
    "verify": ("model.name", "model.revision", "cache.dir", "cache.offline", *_LOGGING, *_LAYOUT),
}  # fmt: skip

ACTION_EXAMPLES = {
    "list": ("mlxnode cache list", "mlxnode cache list --json --cache-dir /Volumes/models"),
    "size": ("mlxnode cache size", "mlxnode cache size org/name --json"),
    "clear": ("mlxnode cache clear org/name", "mlxnode cache clear --all --yes"),
    "prewarm": (
        "mlxnode cache prewarm org/name                  # one host runs the whole model",
        "mlxnode cache prewarm org/name --rank 1 --world-size 3 --strategy pipeline --split 4,2,2",
        "mlxnode cache prewarm org/name --ranks 0,2 --world-size 4 --strategy pipeline --dry-run",
        "mlxnode cache prewarm org/name --all --revision v1.0",
    ),
    "verify": (
        "mlxnode cache verify org/name                   # the ranks it was prewarmed for",
        "mlxnode cache verify org/name --rank 1 --world-size 3 --strategy pipeline "
        "--split 4,2,2 --json",
        "mlxnode cache verify org/name --all             # every file of the model",
    ),
}

# What a cache action calls itself in its log lines: it is no rank of a run.
PREWARM_LABEL = "prewarm"
CACHE_LABEL = "cache"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cache",
        help="Inspect, fill and clean the model cache.",
        description="Inspect, fill and clean the model cache (default ~/.cache/mlx_models; "
        "--cache-dir, cache.dir). `mlxnode cache ACTION --help` shows each action.",
        epilog=examples(*(lines[0] for lines in ACTION_EXAMPLES.values())),
        formatter_class=HelpFormatter,
    )
    verbs = parser.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    for name, text in ACTIONS.items():
        verb = verbs.add_parser(
            name,
            help=text,
            description=text,
            epilog=examples(*ACTION_EXAMPLES[name]),
            formatter_class=HelpFormatter,
        )
        _ADD_ARGUMENTS[name](verb)
        add_config_flags(verb, keys=ACTION_KEYS[name])
        verb.set_defaults(handler=main)


def _add_list(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")


def _add_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "repo", nargs="?", metavar="MODEL", help="Hub repo id (org/name); all models if omitted."
    )
    parser.add_argument("--json", action="store_true", help="Print JSON instead of text.")


def _add_clear(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "repo", nargs="?", metavar="MODEL", help="Hub repo id (org/name); default: model.name."
    )
    parser.add_argument(
        "--all",
        dest="all_models",
        action="store_true",
        help="Delete every model mlxnode cached (directories holding its mlxnode.json).",
    )
    parser.add_argument("--yes", action="store_true", help="Delete without asking.")


def _add_ranks(parser: argparse.ArgumentParser, *, doing: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--rank", type=int, metavar="R", help="The one rank this host runs.")
    group.add_argument(
        "--ranks", type=_int_list, metavar="R,R,...", help="The ranks this host runs, e.g. 0,2."
    )
    # Default None, read as 1: `verify` tells "not given" from "1" (see _verify_specs).
    parser.add_argument(
        "--world-size", type=int, metavar="N", help="Number of ranks in total (default: 1)."
    )
    parser.add_argument(
        "--all",
        dest="all_files",
        action="store_true",
        help=f"{doing} every file of the repo, not only what the ranks need.",
    )


def _add_prewarm(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "repo", nargs="?", metavar="MODEL", help="Hub repo id (org/name); default: model.name."
    )
    _add_ranks(parser, doing="Fetch")
    parser.add_argument("--quiet", action="store_true", help="Show no download progress.")
    parser.add_argument(
        "--dry-run", action="store_true", help="List the files needed without downloading weights."
    )
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")


def _add_verify(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "repo", nargs="?", metavar="MODEL", help="Hub repo id (org/name); default: model.name."
    )
    _add_ranks(parser, doing="Check")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")


_ADD_ARGUMENTS = {
    "list": _add_list,
    "size": _add_size,
    "clear": _add_clear,
    "prewarm": _add_prewarm,
    "verify": _add_verify,
}


def main(args: argparse.Namespace) -> int:
    action = args.cache_command
    resolved = configure(args, label=PREWARM_LABEL if action == "prewarm" else CACHE_LABEL)
    if action == "list":
        return list_models(resolved, as_json=args.json)
    if action == "size":
        return _size(resolved, args.repo, as_json=args.json)
    if action == "clear":
        return clear_models(resolved, args.repo, all_models=args.all_models, yes=args.yes)
    if action == "prewarm":
        return _prewarm(resolved, args)
    if action == "verify":
        return _verify(resolved, args)
    raise UsageError(f"unknown cache action {action!r}")


# -- list, size, clear: also called by `mlxnode run --list-cached / --clear-cache`


def list_models(resolved: ResolvedConfig, *, as_json: bool = False) -> int:
    """Print the cached models: revision, commit, files, size, ranks each is complete for."""
    manager = ModelCacheManager.from_config(resolved.config, progress=False)
    models = manager.list_models()
    if as_json:
        _print_json(
            {"cache_dir": str(manager.cache_dir), "models": [_model_json(m) for m in models]}
        )
        return 0
    if not models:
        print(f"no models cached in {manager.cache_dir}")
        return 0
    columns = ("MODEL", "REVISION", "COMMIT", "FILES", "SIZE", "LAST USED", "COMPLETE FOR")
    rows = []
    for model in models:
        if not model.commits:
            rows.append((model.repo_id, "-", "-", "0/?", format_bytes(model.size_bytes), "-", "-"))
        for c in model.commits:
            rows.append(
                (
                    model.repo_id,
                    ",".join(c.revisions) or "-",
                    c.commit[:10],
                    f"{c.files_present}/{c.files_expected}",
                    format_bytes(model.size_bytes),
                    _when(model.last_used),
                    "; ".join(_describe_prewarm(p) for p in c.complete_for) or "-",
                )
            )
    print("\n".join(format_table(rows, columns)))
    return 0


def clear_models(
    resolved: ResolvedConfig,
    model: str | None = None,
    *,
    all_models: bool = False,
    yes: bool = False,
) -> int:
    """Delete one model (`model`, else ``model.name``), or with `all_models` every model.

    Never anything outside the cache, never a ``--model-path`` directory, never a
    directory without mlxnode's metadata file. Asks on a terminal; refuses without
    `yes` when stdin is not one.

    Raises:
        UsageError: no model and no `all_models`, both, two different models, or
            ``--model-path`` given.
    """
    config = resolved.config
    if _from_cli(resolved, "model.path"):
        raise UsageError(
            f"--model-path {config.model.path} is a local model directory, never the cache's "
            "to delete; give the Hub MODEL (org/name) to clear, or --all"
        )
    flag_model = config.model.name if _from_cli(resolved, "model.name") else None
    if model is not None and flag_model is not None and model != flag_model:
        raise UsageError(f"two models to clear: {model} and --model {flag_model}; give one")
    if all_models and (model or flag_model):
        raise UsageError(f"give a MODEL to clear or --all, not both (got {model or flag_model})")
    if not all_models:
        model = model or config.model.name
        if model is None:
            raise UsageError(
                "nothing to clear: give the MODEL (org/name) or set model.name; "
                "`mlxnode cache clear --all` clears every cached model"
            )
    manager = ModelCacheManager.from_config(config, progress=False)
    if model is not None:
        targets = [validate_repo_id(model)]
    else:
        targets = [m.repo_id for m in manager.list_models()]
        if not targets:
            print(f"no models cached in {manager.cache_dir}")
            return 0
    sizes = {t: manager.model_size(t) for t in targets}
    what = (
        f"{targets[0]} ({format_bytes(sizes[targets[0]])})"
        if model is not None
        else f"all {len(targets)} models ({format_bytes(sum(sizes.values()))})"
    )
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(
                f"refusing to delete {what} from {manager.cache_dir} without --yes "
                "(stdin is not a terminal to ask on)"
            )
        sys.stderr.write(f"Delete {what} from {manager.cache_dir}? [y/N] ")
        sys.stderr.flush()
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 0
    for target in targets:
        freed = manager.remove(target)
        print(f"removed {target} ({format_bytes(freed)})")
    return 0


def _size(resolved: ResolvedConfig, repo: str | None, *, as_json: bool) -> int:
    manager = ModelCacheManager.from_config(resolved.config, progress=False)
    if repo is not None:
        sizes = {repo: manager.model_size(repo)}
    else:
        sizes = {m.repo_id: m.size_bytes for m in manager.list_models()}
    total = sum(sizes.values())
    if as_json:
        _print_json(
            {
                "cache_dir": str(manager.cache_dir),
                "models": sizes,
                "bytes": total,
                "human": format_bytes(total),
            }
        )
        return 0
    rows = [(format_bytes(size), size, name) for name, size in sizes.items()]
    if repo is None:
        rows.append((format_bytes(total), total, f"total in {manager.cache_dir}"))
    print("\n".join(format_table(rows, ("SIZE", "BYTES", "MODEL"))))
    return 0


# -- prewarm, verify


def _prewarm(resolved: ResolvedConfig, args: argparse.Namespace) -> int:
    config = resolved.config
    repo = args.repo or config.model.name
    if repo is None and config.model.path:
        return _report_local(local_model(config.model.path), as_json=args.json)
    if repo is None:
        raise UsageError("give the MODEL to prewarm (org/name), or set model.name")
    ranks = _ranks(args, config.distributed.strategy)
    manager = ModelCacheManager.from_config(config, progress=not args.quiet)
    spec = RankSpec(
        ranks=ranks,
        world_size=_world_size(args),
        strategy=config.distributed.strategy,
        split=config.distributed.split,
        weights=config.distributed.weights,
        all_files=args.all_files,
    )
    if args.dry_run:
        plan = manager.plan(repo, spec, revision=config.model.revision)
        result: dict[str, Any] = {
            "model": repo,
            "revision": config.model.revision,
            "commit": plan.commit,
            "path": str(plan.path),
            "ref": _ref_file(manager, repo, config.model.revision),
            **_spec_json(ranks, args, config, plan.plan.split),
            "needed": [
                {"file": f, "size": plan.sizes.get(f), "cached": f in plan.cached}
                for f in plan.plan.files
            ],
            "needed_bytes": sum(plan.sizes.get(f) or 0 for f in plan.plan.files),
            "missing": plan.missing,
            "missing_bytes": sum(plan.sizes.get(f) or 0 for f in plan.missing),
            "dry_run": True,
            "changed": False,
        }
    else:
        model = manager.ensure_model(
            repo, spec, revision=config.model.revision, force=config.cache.force_download
        )
        sizes = model.sizes
        result = {
            "model": repo,
            "revision": config.model.revision,
            "commit": model.commit,
            "path": str(model.path),
            "ref": _ref_file(manager, repo, config.model.revision),
            **_spec_json(ranks, args, config, None),
            "needed": [{"file": f, "size": sizes.get(f)} for f in model.files],
            "needed_bytes": sum(sizes.get(f) or 0 for f in model.files),
            "fetched": model.fetched_files,
            "fetched_bytes": model.fetched_bytes,
            "seconds": round(model.seconds, 3),
            "dry_run": False,
            "changed": bool(model.fetched_files),
        }
    if args.json:
        _print_json(result)
        return 0
    head = f"{repo} @ {result['commit'][:10]} ({config.model.revision}) -> {result['path']}"
    print(head)
    needed_bytes = sum(n["size"] or 0 for n in result["needed"])
    print(f"  needed:  {len(result['needed'])} files, {format_bytes(needed_bytes)}")
    for item in result["needed"]:
        note = "" if not args.dry_run else ("  cached" if item["cached"] else "  missing")
        size = format_bytes(item["size"]) if item["size"] is not None else "?"
        print(f"    {item['file']}  {size}{note}")
    if args.dry_run:
        print(
            f"  would fetch {len(result['missing'])} files, {format_bytes(result['missing_bytes'])}"
        )
    else:
        print(
            f"  fetched: {len(result['fetched'])} files, {format_bytes(result['fetched_bytes'])} "
            f"in {result['seconds']:.1f}s"
        )
    return 0


def _verify(resolved: ResolvedConfig, args: argparse.Namespace) -> int:
    config = resolved.config
    repo = args.repo or config.model.name
    if repo is None:
        raise UsageError("give the MODEL to verify (org/name), or set model.name")
    manager = ModelCacheManager.from_config(config, progress=False)
    revision = config.model.revision
    specs = _verify_specs(manager, repo, revision, args, config)
    reports = [manager.verify(repo, RankSpec(**spec), revision=revision) for spec in specs]
    result = {
        "model": repo,
        "commit": reports[0].commit,
        "path": str(reports[0].path),
        "ok": all(r.ok for r in reports),
        "checked": list(dict.fromkeys(n for r in reports for n in r.checked)),
        "missing": list(dict.fromkeys(n for r in reports for n in r.missing)),
        "corrupt": {n: why for r in reports for n, why in r.corrupt.items()},
        "checked_for": [_spec_of(spec) for spec in specs],
    }
    _show_verify(result, as_json=args.json)
    bad = [(spec, r) for spec, r in zip(specs, reports, strict=True) if not r.ok]
    if bad:
        problems = [*(f"{n} missing" for n in result["missing"]), *result["corrupt"]]
        where = _cache_dir_flag(resolved)
        fixes = " and ".join(
            f"`{_prewarm_command(repo, revision, spec, where, force=bool(r.corrupt))}`"
            for spec, r in bad
        )
        raise CacheError(
            f"{repo} is not usable for {'; '.join(_describe_spec(s) for s, _ in bad)}: "
            f"{len(result['missing'])} missing, {len(result['corrupt'])} corrupt "
            f"({', '.join(problems[:5])}{', ...' if len(problems) > 5 else ''}); run {fixes}",
            path=result["path"],
        )
    return 0


def _show_verify(result: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        _print_json(result)
        return
    print(f"{result['model']} @ {result['commit'][:10]} in {result['path']}")
    print(f"  for: {'; '.join(_describe_spec(spec) for spec in result['checked_for'])}")
    for name in result["checked"]:
        problem = result["corrupt"].get(name)
        note = f"  ({problem})" if problem else ""
        print(f"  {'CORRUPT' if problem else 'ok':8} {name}{note}")
    for name in result["missing"]:
        print(f"  {'MISSING':8} {name}")


def _verify_specs(
    manager: ModelCacheManager,
    repo: str,
    revision: str,
    args: argparse.Namespace,
    config: Any,
) -> list[dict[str, Any]]:
    """What to verify: the ranks given, else every rank set the model was prewarmed for.

    A host of a 3-way pipeline holds only its rank's files; checking the whole model
    there would call a correct cache broken. With no prewarm recorded (an older cache),
    the given or default ranks are checked, as the flags say.
    """
    given = (args.rank, args.ranks, args.world_size)
    if all(v is None for v in given) and not args.all_files:
        records = manager.prewarm_records(repo, revision=revision)
        if any(r.all_files for r in records):
            records = [next(r for r in records if r.all_files)]  # covers every other record
        if records:
            return [
                {
                    "ranks": r.ranks,
                    "world_size": r.world_size,
                    "strategy": r.strategy,
                    "split": r.split,
                    "weights": None,
                    "all_files": r.all_files,
                }
                for r in records
            ]
    return [
        {
            "ranks": _ranks(args, config.distributed.strategy),
            "world_size": _world_size(args),
            "strategy": config.distributed.strategy,
            "split": config.distributed.split,
            "weights": config.distributed.weights,
            "all_files": args.all_files,
        }
    ]


def _spec_of(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: spec[k] for k in ("ranks", "world_size", "strategy", "split", "all_files")}


def _describe_spec(spec: dict[str, Any]) -> str:
    if spec["all_files"]:
        return "every file"
    split = f", split {','.join(map(str, spec['split']))}" if spec["split"] else ""
    return (
        f"ranks {','.join(map(str, spec['ranks']))} of {spec['world_size']} "
        f"({spec['strategy']}{split})"
    )


def _prewarm_command(
    repo: str, revision: str, spec: dict[str, Any], where: list[str], *, force: bool
) -> str:
    """The `mlxnode cache prewarm` that fetches what `spec` needs again into `where`."""
    words = ["mlxnode", "cache", "prewarm", repo, *where]
    if revision != DEFAULT_REVISION:
        words += ["--revision", revision]
    if spec["all_files"]:
        words.append("--all")
    elif spec["world_size"] > 1 or spec["ranks"] != [0]:
        words += ["--ranks", ",".join(map(str, spec["ranks"])), "--world-size"]
        words += [str(spec["world_size"]), "--strategy", spec["strategy"]]
        if spec["split"]:
            words += ["--split", ",".join(map(str, spec["split"]))]
    if force:
        words.append("--force-download")
    return shlex.join(words)


# -- helpers


def _from_cli(resolved: ResolvedConfig, key: str) -> bool:
    return resolved.sources.get(key, "").startswith("cli:")


def _cache_dir_flag(resolved: ResolvedConfig) -> list[str]:
    """`--cache-dir DIR` when a flag or a config file chose it (the environment persists)."""
    source = resolved.sources.get("cache.dir", "default")
    if source == "default" or source.startswith("env:"):
        return []
    return ["--cache-dir", resolved.config.cache.dir]


def _world_size(args: argparse.Namespace) -> int:
    return 1 if args.world_size is None else args.world_size


def _ranks(args: argparse.Namespace, strategy: str) -> list[int]:
    if args.rank is not None:
        return [args.rank]
    if args.ranks is not None:
        return args.ranks
    if _world_size(args) > 1 and strategy == "pipeline" and not args.all_files:
        raise UsageError(
            f"a {_world_size(args)}-way pipeline needs --rank R or --ranks R,R to know which "
            "layers this host holds (or --all for every file)"
        )
    return [0]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,2, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one rank")
    return values


def _spec_json(
    ranks: Sequence[int], args: argparse.Namespace, config: Any, split: Sequence[int] | None
) -> dict[str, Any]:
    return {
        "ranks": list(ranks),
        "world_size": _world_size(args),
        "strategy": config.distributed.strategy,
        "split": list(split) if split is not None else config.distributed.split,
        "all_files": args.all_files,
    }


def _ref_file(manager: ModelCacheManager, repo: str, revision: str) -> str | None:
    """The file recording which commit `revision` names; None for a commit (it has none)."""
    return None if is_commit(revision) else str(ModelPaths(manager.cache_dir, repo).ref(revision))


def _report_local(model: LocalModel, *, as_json: bool) -> int:
    result = {
        "model": str(model.path),
        "commit": None,
        "path": str(model.path),
        "needed": [{"file": f, "size": (model.path / f).stat().st_size} for f in model.files],
        "fetched": [],
        "fetched_bytes": 0,
        "seconds": round(model.seconds, 3),
        "changed": False,
    }
    if as_json:
        _print_json(result)
    else:
        print(
            f"{model.path} is a local model directory (--model-path): "
            "used in place, nothing to fetch"
        )
    return 0


def _model_json(model: Any) -> dict[str, Any]:
    return {
        "model": model.repo_id,
        "path": str(model.path),
        "size_bytes": model.size_bytes,
        "last_used": model.last_used,
        "commits": [
            {
                "commit": c.commit,
                "revisions": c.revisions,
                "path": str(c.path),
                "files_present": c.files_present,
                "files_expected": c.files_expected,
                "complete_for": [
                    {
                        "ranks": p.ranks,
                        "world_size": p.world_size,
                        "strategy": p.strategy,
                        "split": p.split,
                        "all_files": p.all_files,
                    }
                    for p in c.complete_for
                ],
            }
            for c in model.commits
        ],
    }


def _describe_prewarm(p: Any) -> str:
    if p.all_files:
        return "all files"
    ranks = ",".join(map(str, p.ranks))
    split = f" [{','.join(map(str, p.split))}]" if p.split else ""
    return f"ranks {ranks}/{p.world_size} {p.strategy}{split}"


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))
