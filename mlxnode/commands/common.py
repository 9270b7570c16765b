"""Flags shared by several verbs, bound to configuration keys, and how help reads.

`CONFIG_FLAGS` is the one table from a flag to the setting it overrides; the
README's flag reference and `mlxnode config show` both follow it. Each verb offers
only the settings it reads (`add_config_flags` with `sections` or `keys`), and the
defaults its help shows come from the config dataclasses, never from a second copy.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from .. import config as cfg
from ..config import ResolvedConfig, iter_fields, load_config
from ..logs import setup_logging

PRECEDENCE = (
    "Settings resolve as: flag > MLXNODE_<SECTION>_<KEY> environment variable > config file "
    "> default;\n`mlxnode config show` prints each value and where it came from."
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of a verb's description and examples (its epilog)."""


@dataclass(frozen=True)
class ConfigFlag:
    key: str
    flags: tuple[str, ...]  # long spellings; the first names the flag in messages
    help: str
    # "value"; "true" (store True); "false" (store False); "bool" (--flag / --no-flag)
    kind: str = "value"
    metavar: str | None = None
    short: str | None = None  # only for the few settings typed on every run

    @property
    def names(self) -> tuple[str, ...]:
        """Every spelling argparse accepts, the short one first (as help lists them)."""
        return ((self.short,) if self.short else ()) + self.flags


CONFIG_FLAGS: tuple[ConfigFlag, ...] = (
    ConfigFlag(
        "model.name",
        ("--model", "--model-name"),
        "Hub repo id of the model (org/name).",
        metavar="REPO",
        short="-m",
    ),
    ConfigFlag(
        "model.path", ("--model-path",), "Local model directory, used in place.", metavar="DIR"
    ),
    ConfigFlag(
        "model.revision", ("--revision",), "Hub branch, tag or commit of the model.", metavar="REV"
    ),
    ConfigFlag(
        "generation.max_tokens",
        ("--max-tokens",),
        "Most tokens to generate.",
        metavar="N",
        short="-n",
    ),
    ConfigFlag(
        "generation.temperature",
        ("--temperature",),
        "Sampling temperature; 0 is greedy.",
        metavar="T",
        short="-t",
    ),
    ConfigFlag("generation.top_p", ("--top-p",), "Nucleus sampling probability mass.", metavar="P"),
    ConfigFlag("generation.seed", ("--seed",), "Random seed, the same on every rank.", metavar="N"),
    ConfigFlag(
        "generation.chat_template",
        ("--chat-template",),
        "Chat template (Jinja text or a file) to use instead of the model's.",
        metavar="TEMPLATE",
    ),
    ConfigFlag(
        "generation.use_chat_template",
        ("--no-chat-template",),
        "Send the prompt as is, without the chat template.",
        kind="false",
    ),
    ConfigFlag("cache.dir", ("--cache-dir",), "Directory of the model cache.", metavar="DIR"),
    ConfigFlag(
        "cache.offline",
        ("--offline",),
        "Use only cached files; never contact the Hub (--no-offline: do, whatever the "
        "config file says).",
        kind="bool",
    ),
    ConfigFlag(
        "cache.force_download",
        ("--force-download",),
        "Download the model files again even if cached.",
        kind="true",
    ),
    ConfigFlag(
        "cache.max_retries",
        ("--max-retries",),
        "Retries per file on transient errors.",
        metavar="N",
    ),
    ConfigFlag(
        "cache.backoff_base",
        ("--backoff-base",),
        "First retry delay in seconds; it doubles each retry.",
        metavar="S",
    ),
    ConfigFlag(
        "cache.lock_timeout",
        ("--lock-timeout",),
        "Seconds to wait for another process holding the cache lock.",
        metavar="S",
    ),
    ConfigFlag(
        "logging.level",
        ("--log-level",),
        "Log level; DEBUG also shows tracebacks.",
        metavar="LEVEL",
    ),
    ConfigFlag(
        "logging.file", ("--log-file",), "Log file; rank R writes NAME.rankR.log.", metavar="PATH"
    ),
    ConfigFlag(
        "distributed.strategy",
        ("--strategy",),
        "How to split the model over ranks.",
        metavar="{auto,pipeline,tensor,replicas}",
    ),
    ConfigFlag(
        "distributed.backend", ("--backend",), "mx.distributed backend to use.", metavar="NAME"
    ),
    ConfigFlag(
        "distributed.split",
        ("--split",),
        "Layers per rank in rank order, e.g. 20,12.",
        metavar="N,N,...",
    ),
    ConfigFlag(
        "distributed.weights",
        ("--weights",),
        "Relative memory per rank, e.g. 192,64; layers are split in proportion.",
        metavar="W,W,...",
    ),
    ConfigFlag(
        "distributed.overlap",
        ("--overlap",),
        "Pipeline: keep every stage busy, prompts read in chunks and a batch in one "
        "micro-batch per stage (--no-overlap: one stage at a time, as mlx-lm does).",
        kind="bool",
    ),
    ConfigFlag(
        "distributed.step_timeout",
        ("--step-timeout",),
        "Seconds a rank waits on its peers before failing.",
        metavar="S",
    ),
    ConfigFlag("serve.host", ("--host",), "Address rank 0's HTTP server binds.", metavar="ADDR"),
    ConfigFlag("serve.port", ("--port",), "TCP port of rank 0's HTTP server.", metavar="PORT"),
    ConfigFlag(
        "serve.queue_size",
        ("--queue-size",),
        "Requests that may wait for a place in the batch; more get 429.",
        metavar="N",
    ),
    ConfigFlag("serve.max_batch", ("--max-batch",), "Requests generating at once.", metavar="N"),
    ConfigFlag(
        "serve.max_body_bytes",
        ("--max-body-bytes",),
        "Largest request body; more gets 413.",
        metavar="N",
    ),
    ConfigFlag(
        "serve.ready_window",
        ("--ready-window",),
        "/ready needs a probe generation on every rank within this many seconds.",
        metavar="S",
    ),
    ConfigFlag(
        "serve.ready_deadline",
        ("--ready-deadline",),
        "Seconds a probe generation may take before /ready answers 503.",
        metavar="S",
    ),
)

# The sections every verb but `serve` takes flags for.
RUN_SECTIONS = ("model", "generation", "cache", "logging", "distributed")


def add_config_flags(
    parser: argparse.ArgumentParser,
    *,
    sections: tuple[str, ...] | None = None,
    keys: tuple[str, ...] | None = None,
) -> None:
    """Add `--config`, `--no-config` and the setting flags (all, `sections`, or `keys`)."""
    defaults = _defaults()
    files = parser.add_mutually_exclusive_group()
    files.add_argument(
        "-c",
        "--config",
        metavar="PATH",
        help=f"YAML config file (default: first of {', '.join(cfg.CONFIG_FILENAMES)} here).",
    )
    files.add_argument(
        "--no-config",
        action="store_true",
        help="Read no config file, not even one in the working directory.",
    )
    group = parser.add_argument_group("settings (override config file and MLXNODE_* env)")
    for flag in CONFIG_FLAGS:
        if sections is not None and flag.key.split(".")[0] not in sections:
            continue
        if keys is not None and flag.key not in keys:
            continue
        dest = _dest(flag.key)
        if flag.kind == "value":
            text = _with_default(flag.help, defaults[flag.key])
            group.add_argument(*flag.names, dest=dest, metavar=flag.metavar, help=text)
        elif flag.kind == "bool":
            group.add_argument(
                *flag.names, dest=dest, action=argparse.BooleanOptionalAction, help=flag.help
            )
        else:
            group.add_argument(
                *flag.names,
                dest=dest,
                action="store_const",
                const=flag.kind == "true",
                help=flag.help,
            )


def resolve_config(args: argparse.Namespace) -> ResolvedConfig:
    """The configuration for this invocation: flags > env > file > defaults."""
    overrides: dict[str, tuple[Any, str]] = {}
    for flag in CONFIG_FLAGS:
        value = getattr(args, _dest(flag.key), None)
        if value is not None:
            overrides[flag.key] = (value, flag.flags[0])
    return load_config(
        config_path=getattr(args, "config", None),
        discover=not getattr(args, "no_config", False),
        overrides=overrides,
    )


def configure(args: argparse.Namespace, *, label: str | None = None) -> ResolvedConfig:
    """Resolve the configuration, then set up logging from it.

    Args:
        label: What this process's log lines say instead of ``Rank X/Y`` (``launcher``):
            only a rank of a run has a rank.
    """
    resolved = resolve_config(args)
    # The CLI boundary reads args.log_level to decide on tracebacks; keep it resolved.
    args.log_level = resolved.config.logging.level
    setup_logging(resolved.config.logging.level, resolved.config.logging.file, label=label)
    return resolved


def examples(*lines: str) -> str:
    """An epilog: the example command lines, then how settings resolve."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines) + "\n\n" + PRECEDENCE


def _defaults() -> dict[str, Any]:
    return {key: f.default for key, f, _type in iter_fields()}


def _with_default(text: str, default: Any) -> str:
    """`text` ending in "(default: 256)."; as is for a setting unset by default."""
    if default is None or default is dataclasses.MISSING:
        return text
    return f"{text.removesuffix('.')} (default: {default})."


def _dest(key: str) -> str:
    return "cfg__" + key.replace(".", "__")
