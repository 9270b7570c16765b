"""A model's files: where they are, its config and tokenizer, and checks on its weights.

Everything here reads files and reads no weight into memory: `read_metadata` gives what a
rank needs before loading (to check the prompts), `build_model` a lazily loaded instance,
and the checks turn a missing or truncated weight file into an error that names it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.nn as nn

from .config import Config
from .errors import ModelLoadError, UsageError
from .sharding import check_layer_coverage, files_for_layers

# Config keys that give a model's context length, most common first.
_CONTEXT_KEYS = (
    "max_position_embeddings",
    "max_sequence_length",
    "seq_length",
    "n_positions",
    "max_seq_len",
    "n_ctx",
)
_INDEX_FILE = "model.safetensors.index.json"
# safetensors caps its JSON header at 100 MB.
_MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class ModelMetadata:
    """What a rank knows of a model before reading any weight.

    `path` holds config.json and the tokenizer, and the weights too unless `cached`: then
    each rank fetches only the weight files its shard needs, once it knows its shard.
    """

    path: Path
    name: str
    config: dict[str, Any]
    tokenizer: Any  # mlx-lm's TokenizerWrapper
    cached: bool

    @property
    def context_length(self) -> int | None:
        return context_length(self.config)


def read_metadata(config: Config) -> ModelMetadata:
    """Find the model of `config` and read its config and tokenizer (no weights).

    With ``model.name`` the files come through the cache (config, tokenizer, index only).

    Args:
        config: The resolved configuration; reads ``model`` and ``generation.chat_template``.

    Returns:
        The model's metadata.

    Raises:
        UsageError: no model given, or an unreadable ``--chat-template`` file.
        ModelLoadError: the directory is not a model, or its tokenizer does not load.
    """
    if config.model.path:
        path = Path(config.model.path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is not a model directory (no config.json); check --model-path"
            )
        name, cached = str(path), False
    elif config.model.name:
        name, cached = config.model.name, True
        path = Path(cache_manager(config).fetch_metadata(name, revision=config.model.revision))
    else:
        raise UsageError("no model: pass --model ORG/NAME or --model-path DIR, or set model.name")
    model_config = read_model_config(path)
    tokenizer = load_tokenizer(path, model_config, config.generation.chat_template)
    return ModelMetadata(path, name, model_config, tokenizer, cached)


def cache_manager(config: Config) -> Any:
    """The model cache for ``model.name``: the one place loading touches it."""
    from .cache import ModelCacheManager

    return ModelCacheManager.from_config(config)


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """The model's config.json.

    Raises:
        ModelLoadError: it cannot be read or is not a JSON object.
    """
    path = model_dir / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object; is this a model directory?")
    return data


def load_tokenizer(model_dir: Path, model_config: dict[str, Any], chat_template: str | None):
    """mlx-lm's tokenizer of `model_dir`, with `chat_template` (text or file) if given.

    Raises:
        UsageError: `chat_template` is neither a template nor a readable file.
        ModelLoadError: the tokenizer does not load.
    """
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    extra = {}
    if chat_template:
        extra["chat_template"] = _read_template(chat_template)
    try:
        return mlx_lm_load_tokenizer(
            model_dir, extra or None, eos_token_ids=model_config.get("eos_token_id")
        )
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot load the tokenizer of {model_dir}: {e}") from e


def _read_template(value: str) -> str:
    """``--chat-template``: Jinja text as is, or the text of the file it names."""
    if "{" in value:
        return value
    path = Path(value).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(
            f"--chat-template {value!r} is neither a Jinja template (no '{{') nor a readable "
            f"file ({e})"
        ) from e


def build_model(model_dir: Path, name: str) -> nn.Module:
    """The model with lazily loaded weights (none read yet; missing files allowed).

    Raises:
        ModelLoadError: a weight file is not readable safetensors, or mlx-lm cannot build it.
    """
    from mlx_lm.utils import load_model

    # mlx-lm reads every present file's header here; a truncated one must be named.
    for path in sorted(model_dir.glob("model*.safetensors")):
        check_safetensors(path)
    try:
        model, _ = load_model(model_dir, lazy=True, strict=False)
    except ValueError as e:
        raise ModelLoadError(f"mlx-lm cannot load {name}: {e}") from e
    except (OSError, KeyError, TypeError) as e:
        raise ModelLoadError(f"cannot load {name} from {model_dir}: {e}") from e
    return model


def check_weight_files(
    model_dir: Path, layers: tuple[int, int] | None, layer_count: int, rank: int
) -> None:
    """Fail clearly when a weight file that `layers` need is absent (strict=False would not).

    Args:
        model_dir: Where the weights are.
        layers: This rank's [start, end) of a pipeline; None: every layer.
        layer_count: How many layers the model has.
        rank: Named in the error.

    Raises:
        ModelLoadError: no weights at all, a layer the checkpoint lacks, or a missing file.
    """
    index = model_dir / _INDEX_FILE
    if not index.is_file():
        if not any(model_dir.glob("model*.safetensors")):
            raise ModelLoadError(f"{model_dir} has no weights (model*.safetensors)")
        return
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot read {index}: {e}") from e
    check_layer_coverage(weight_map, layer_count, what=str(model_dir))
    start, end = layers if layers else (0, layer_count)
    needed = files_for_layers(weight_map, start, end, head=end == layer_count)
    missing = sorted(f for f in needed if not (model_dir / f).is_file())
    if missing:
        raise ModelLoadError(
            f"rank {rank} needs {', '.join(missing)} (layers {start}-{end - 1}) but "
            f"{model_dir} lacks them; fetch the model again"
        )


def check_safetensors(path: Path) -> None:
    """Fail with the file's name when a weight file is truncated or not safetensors.

    MLX would otherwise fail inside the lazy load with a RuntimeError naming no file.

    Raises:
        ModelLoadError: the header is unreadable, or the file is shorter than it says.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
            if header_len < 2 or 8 + header_len > size or header_len > _MAX_HEADER_BYTES:
                raise ValueError("its header is cut short or malformed")
            header = json.loads(f.read(header_len))
        ends = [
            int(t["data_offsets"][1])
            for k, t in header.items()
            if k != "__metadata__" and isinstance(t, dict)
        ]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise ModelLoadError(
            f"{path} is not a readable safetensors file ({e}); fetch the model again"
        ) from e
    needed = 8 + header_len + max(ends, default=0)
    if size < needed:
        raise ModelLoadError(
            f"{path} is truncated: {size} bytes but its header describes {needed}; "
            "fetch the model again"
        )


def context_length(model_config: dict[str, Any]) -> int | None:
    """The longest sequence the model takes, from its config, if it says."""
    for source in (model_config, model_config.get("text_config", {})):
        for key in _CONTEXT_KEYS:
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None
