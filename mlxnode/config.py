"""The toolkit's one configuration model, and how its values are resolved.

Precedence, highest first: command-line flag > environment variable
(``MLXNODE_<SECTION>_<KEY>``) > configuration file > built-in default. Every
resolved value remembers where it came from, so ``mlxnode config show`` can say.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import reprlib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

# Files looked for in the working directory when --config is not given; first found wins.
CONFIG_FILENAMES = ("config.yaml", "config.yml", ".mlx-config.yaml")
ENV_PREFIX = "MLXNODE_"

DEFAULT_CACHE_DIR = "~/.cache/mlx_models"
DEFAULT_REVISION = "main"
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.0
DEFAULT_TOP_P = 1.0
DEFAULT_SEED = 0
DEFAULT_LOG_LEVEL = "INFO"
DEFAULT_STRATEGY = "auto"
DEFAULT_BACKEND = "ring"
DEFAULT_MAX_RETRIES = 5
DEFAULT_BACKOFF_BASE = 1.0
DEFAULT_LOCK_TIMEOUT = 600.0
DEFAULT_STEP_TIMEOUT = 60.0
DEFAULT_SERVE_HOST = "127.0.0.1"
DEFAULT_SERVE_PORT = 8080
DEFAULT_SERVE_QUEUE_SIZE = 64
DEFAULT_SERVE_MAX_BATCH = 32
DEFAULT_SERVE_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_SERVE_READY_WINDOW = 30.0
DEFAULT_SERVE_READY_DEADLINE = 10.0

# A config file is a few hundred bytes; anything this big is a mistake, and parsing it is slow.
MAX_CONFIG_BYTES = 1024 * 1024
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring = 3, 6, 6, 80

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
STRATEGIES = ("auto", "pipeline", "tensor", "replicas")
BACKENDS = ("ring", "jaccl", "jaccl-ring", "mpi", "nccl", "any")


@dataclass
class ModelConfig:
    name: str | None = field(default=None, metadata={"help": "Hub repo id, e.g. org/name."})
    path: str | None = field(
        default=None, metadata={"help": "Local model directory, used in place instead of name."}
    )
    revision: str = field(default=DEFAULT_REVISION, metadata={"help": "Hub branch, tag or commit."})


@dataclass
class GenerationConfig:
    max_tokens: int = field(
        default=DEFAULT_MAX_TOKENS, metadata={"help": "Most tokens to generate.", "min": 1}
    )
    temperature: float = field(
        default=DEFAULT_TEMPERATURE, metadata={"help": "0 is greedy.", "min": 0.0}
    )
    top_p: float = field(
        default=DEFAULT_TOP_P, metadata={"help": "Nucleus sampling mass, in (0, 1].", "min": 0.0}
    )
    seed: int = field(
        default=DEFAULT_SEED,
        # mx.random.seed takes an unsigned 64-bit integer.
        metadata={"help": "Sampling seed, same on all ranks.", "min": 0, "max": 2**64 - 1},
    )
    chat_template: str | None = field(
        default=None, metadata={"help": "Chat template (Jinja text or file) to use instead."}
    )
    use_chat_template: bool = field(
        default=True, metadata={"help": "Apply the tokenizer's chat template when it has one."}
    )


@dataclass
class CacheConfig:
    dir: str = field(default=DEFAULT_CACHE_DIR, metadata={"help": "Where models are cached."})
    offline: bool = field(default=False, metadata={"help": "Use only cached files."})
    force_download: bool = field(default=False, metadata={"help": "Fetch files again."})
    max_retries: int = field(
        default=DEFAULT_MAX_RETRIES,
        metadata={"help": "Retries per file on transient Hub errors.", "min": 0},
    )
    backoff_base: float = field(
        default=DEFAULT_BACKOFF_BASE,
        metadata={"help": "First retry delay in seconds; doubles each time.", "min": 0.0},
    )
    lock_timeout: float = field(
        default=DEFAULT_LOCK_TIMEOUT,
        metadata={"help": "Seconds to wait for another process's cache lock.", "min": 0.0},
    )


@dataclass
class LoggingConfig:
    level: str = field(
        default=DEFAULT_LOG_LEVEL, metadata={"help": "Log level.", "choices": LOG_LEVELS}
    )
    file: str | None = field(
        default=None, metadata={"help": "Log file; each rank writes NAME.rankR.EXT."}
    )


@dataclass
class DistributedConfig:
    strategy: str = field(
        default=DEFAULT_STRATEGY,
        metadata={"help": "How to split the model over ranks.", "choices": STRATEGIES},
    )
    backend: str = field(
        default=DEFAULT_BACKEND,
        metadata={"help": "mx.distributed backend.", "choices": BACKENDS},
    )
    split: list[int] | None = field(
        default=None, metadata={"help": "Layers per rank, in rank order (pipeline)."}
    )
    weights: list[float] | None = field(
        default=None, metadata={"help": "Relative memory per rank; layers are split by it."}
    )
    overlap: bool = field(
        default=True,
        metadata={
            "help": "Keep every pipeline stage busy: prompts in chunks, batches in one "
            "micro-batch per stage."
        },
    )
    step_timeout: float = field(
        default=DEFAULT_STEP_TIMEOUT,
        metadata={"help": "Seconds a rank waits on its peers before giving up.", "min": 0.0},
    )


@dataclass
class ServeConfig:
    host: str = field(
        default=DEFAULT_SERVE_HOST,
        metadata={"help": "Address rank 0's HTTP server binds; another than loopback wants a key."},
    )
    port: int = field(
        default=DEFAULT_SERVE_PORT,
        metadata={"help": "TCP port of rank 0's HTTP server.", "min": 1, "max": 65535},
    )
    api_key: str | None = field(
        default=None,
        metadata={
            "help": "Key clients send as `Authorization: Bearer KEY`; unset: none needed.",
            "secret": True,
        },
    )
    queue_size: int = field(
        default=DEFAULT_SERVE_QUEUE_SIZE,
        metadata={"help": "Requests waiting to join the batch; more are answered 429.", "min": 1},
    )
    max_batch: int = field(
        default=DEFAULT_SERVE_MAX_BATCH,
        metadata={"help": "Requests generating at once (the running batch).", "min": 1},
    )
    max_body_bytes: int = field(
        default=DEFAULT_SERVE_MAX_BODY_BYTES,
        metadata={"help": "Largest request body accepted; more is answered 413.", "min": 1},
    )
    ready_window: float = field(
        default=DEFAULT_SERVE_READY_WINDOW,
        metadata={
            "help": "/ready needs a probe generation on every rank this recent (s).",
            "min": 0.1,
        },
    )
    ready_deadline: float = field(
        default=DEFAULT_SERVE_READY_DEADLINE,
        metadata={"help": "Seconds a probe generation may take before /ready fails.", "min": 0.1},
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


@dataclass
class ResolvedConfig:
    """A configuration and, for every dotted key, where its value came from."""

    config: Config
    sources: dict[str, str]
    file: Path | None = None

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self.config)


def iter_fields() -> typing.Iterator[tuple[str, dataclasses.Field, type]]:
    """Yield (dotted key, field, value type) for every setting, in documentation order."""
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        section_type = hints[section.name]
        section_hints = typing.get_type_hints(section_type)
        for f in dataclasses.fields(section_type):
            yield f"{section.name}.{f.name}", f, section_hints[f.name]


def is_secret(key: str) -> bool:
    """Whether the setting `key` holds a secret, which is never shown or logged."""
    fields = {k: f for k, f, _ in iter_fields()}
    return bool(fields[key].metadata.get("secret"))


def env_var_name(key: str) -> str:
    return ENV_PREFIX + key.replace(".", "_").upper()


def find_config_file(cwd: Path) -> Path | None:
    for name in CONFIG_FILENAMES:
        candidate = cwd / name
        if candidate.is_file():
            return candidate
    return None


def load_config(
    *,
    config_path: str | os.PathLike | None = None,
    discover: bool = True,
    cwd: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, tuple[Any, str]] | None = None,
) -> ResolvedConfig:
    """Resolve the configuration from defaults, a file, the environment and flags.

    Args:
        config_path: An explicit file (``--config``); it must exist. When None, the
            first of `CONFIG_FILENAMES` found in `cwd` is used, if any and `discover`
            is true (``--no-config`` makes it false).
        discover: Look for a config file in `cwd` when `config_path` is None.
        cwd: Directory searched for a config file (default: the working directory).
        environ: Environment to read ``MLXNODE_*`` variables from (default: os.environ).
        overrides: ``{"generation.max_tokens": (64, "--max-tokens")}`` from the CLI;
            values of None are ignored (the flag was not given).

    Raises:
        ConfigError: naming the file, variable or flag, the key and what was expected.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    fields = {key: (f, tp) for key, f, tp in iter_fields()}

    path = _pick_file(config_path, cwd or Path.cwd()) if config_path or discover else None
    if path is not None:
        for key, raw in _read_file(path, fields).items():
            values[key] = _coerce(raw, fields[key][1], source=str(path), key=key, from_text=False)
            sources[key] = str(path)

    known_env = {env_var_name(key): key for key in fields}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = known_env.get(name)
        if key is None and name.removeprefix(ENV_PREFIX).split("_")[0].lower() in _sections():
            hint = _did_you_mean(name, known_env)
            raise ConfigError(f"unknown setting{hint}", source=f"env:{name}")
        if key is None:
            continue  # another tool's MLXNODE_* variable, not a setting
        values[key] = _coerce(raw, fields[key][1], source=f"env:{name}", key=key, from_text=True)
        sources[key] = f"env:{name}"

    for key, (raw, flag) in (overrides or {}).items():
        if raw is None:
            continue
        values[key] = _coerce(
            raw, fields[key][1], source=flag, key=key, from_text=isinstance(raw, str)
        )
        sources[key] = f"cli:{flag}"

    config = Config()
    for key, (f, _tp) in fields.items():
        section, name = key.split(".")
        if key == "logging.level" and isinstance(values.get(key), str):
            values[key] = values[key].upper()
        if key in values:
            _check_bounds(values[key], f, source=sources[key].removeprefix("cli:"), key=key)
            setattr(getattr(config, section), name, values[key])
        else:
            sources[key] = "default"
    return ResolvedConfig(config=config, sources=sources, file=path)


def _pick_file(config_path: str | os.PathLike | None, cwd: Path) -> Path | None:
    if config_path is None:
        return find_config_file(cwd)
    path = Path(config_path).expanduser()
    if not path.exists():
        raise ConfigError("file not found; check the --config path", source=str(path))
    if not path.is_file():
        raise ConfigError("is not a file; --config takes a YAML file", source=str(path))
    return path


def _read_file(path: Path, fields: Mapping[str, Any]) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"file is {size} bytes; a config file holds at most {MAX_CONFIG_BYTES}",
                source=str(path),
            )
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"cannot read file ({reason})", source=str(path)) from e
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"invalid YAML: {where}{e.problem or e}", source=str(path)) from e
    except yaml.YAMLError as e:
        # e.g. ReaderError for control characters; its text spans lines.
        raise ConfigError(f"invalid YAML: {' '.join(str(e).split())}", source=str(path)) from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"expected a mapping of sections ({', '.join(_sections())}), got {_type_name(data)}",
            source=str(path),
        )
    flat: dict[str, Any] = {}
    for section, body in data.items():
        if str(section) not in _sections():
            hint = _did_you_mean(str(section), _sections())
            raise ConfigError(f"unknown section{hint}", source=str(path), key=str(section))
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(
                f"expected a mapping of settings, got {_type_name(body)}",
                source=str(path),
                key=str(section),
            )
        for name, value in body.items():
            key = f"{section}.{name}"
            if key not in fields:
                names = [k.split(".")[1] for k in fields if k.startswith(f"{section}.")]
                hint = _did_you_mean(str(name), names)
                raise ConfigError(f"unknown key{hint}", source=str(path), key=key)
            flat[key] = value
    return flat


def _short_repr(value: Any) -> str:
    """A bounded repr: YAML aliases can make a small file a huge (billion laughs) value."""
    return _REPR.repr(value)


def _sections() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def _did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _coerce(raw: Any, tp: Any, *, source: str, key: str, from_text: bool) -> Any:
    """Turn a raw value into the field's type, or raise ConfigError saying what was expected."""
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
    if raw is None or (from_text and optional and raw == ""):
        if optional:
            return None
        raise ConfigError(f"expected {_describe(tp)}, got nothing", source=source, key=key)

    def fail() -> typing.NoReturn:
        shown = _short_repr(raw)
        raise ConfigError(f"expected {_describe(tp)}, got {shown}", source=source, key=key)

    if typing.get_origin(tp) is list:
        (item_type,) = typing.get_args(tp)
        if from_text or isinstance(raw, str):
            items: list[Any] = [s.strip() for s in str(raw).split(",") if s.strip()]
            text_items = True
        elif isinstance(raw, list | tuple):
            items, text_items = list(raw), False
        else:
            fail()
        try:
            return [_scalar(i, item_type, from_text=text_items) for i in items]
        except (TypeError, ValueError):
            fail()
    try:
        return _scalar(raw, tp, from_text=from_text)
    except (TypeError, ValueError):
        fail()


def _scalar(raw: Any, tp: type, *, from_text: bool) -> Any:
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if from_text and str(raw).strip().lower() in ("1", "true", "yes", "on"):
            return True
        if from_text and str(raw).strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    if tp is int:
        if isinstance(raw, bool):
            raise TypeError(raw)
        if isinstance(raw, int):
            return raw
        if from_text and isinstance(raw, str):
            return int(raw.strip())
        raise TypeError(raw)
    if tp is float:
        if isinstance(raw, bool):
            raise TypeError(raw)
        if isinstance(raw, int | float):
            return float(raw)
        if from_text and isinstance(raw, str):
            return float(raw.strip())
        raise TypeError(raw)
    if tp is str:
        if isinstance(raw, str):
            return raw
        raise TypeError(raw)
    raise TypeError(tp)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return f"a list of {_describe(item).removeprefix('a ').removeprefix('an ')}s"
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}[
        tp
    ]


def _check_bounds(value: Any, f: dataclasses.Field, *, source: str, key: str) -> None:
    if value is None:
        return
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        hint = _did_you_mean(str(value), choices)
        raise ConfigError(
            f"expected one of {', '.join(choices)}, got {value!r}{hint}", source=source, key=key
        )
    items = value if isinstance(value, list) else [value]
    # float("nan") passes every comparison below, and inf breaks samplers and timers.
    if any(isinstance(v, float) and not math.isfinite(v) for v in items):
        raise ConfigError(f"expected a finite number, got {value!r}", source=source, key=key)
    minimum = f.metadata.get("min")
    if minimum is not None and any(v < minimum for v in items):
        raise ConfigError(f"expected a value >= {minimum}, got {value!r}", source=source, key=key)
    maximum = f.metadata.get("max")
    if maximum is not None and any(v > maximum for v in items):
        raise ConfigError(f"expected a value <= {maximum}, got {value!r}", source=source, key=key)
    if key == "generation.top_p" and not 0.0 < value <= 1.0:
        raise ConfigError(f"expected a value in (0, 1], got {value!r}", source=source, key=key)
    if key in ("distributed.split", "distributed.weights") and any(v <= 0 for v in items):
        raise ConfigError(f"every entry must be > 0, got {value!r}", source=source, key=key)
