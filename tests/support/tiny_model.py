"""Deterministic tiny Hugging-Face-style models for tests and demos that cannot download one.

`make_tiny_model` writes a directory that `mlx_lm.load` accepts: `config.json`, a byte-level BPE
tokenizer trained on a small built-in English corpus, and random float32 weights under Hugging
Face checkpoint names, split over several safetensors files the way large checkpoints are. The
same arguments always give the same bytes, so tests can compare checksums and caches can key on
them.

    python -m tests.support.tiny_model /tmp/tiny-qwen2 --arch qwen2 --shards 4
"""

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

logger = logging.getLogger(__name__)

DEFAULT_ARCH = "llama"
DEFAULT_NUM_LAYERS = 8
DEFAULT_HIDDEN_SIZE = 64
DEFAULT_NUM_HEADS = 4
DEFAULT_NUM_KV_HEADS = 2
DEFAULT_VOCAB_SIZE = 512
DEFAULT_NUM_SHARDS = 4
DEFAULT_SEED = 0
DEFAULT_MAX_POSITION_EMBEDDINGS = 512
# Storage dtypes. In 16-bit checkpoints the norm scales and MoE routers stay float32, as in
# many real ones (llama.cpp stores every 1-D tensor as F32; MoE routers and SSM parameters are
# often kept in float32 too): a layer's output is then float32 while its input was 16-bit.
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_DTYPE = "float32"
# intermediate_size defaults to this multiple of hidden_size.
DEFAULT_MLP_RATIO = 4
# Mixture-of-experts architectures: experts per MoE layer, experts each token is routed to,
# and each expert's MLP width (moe_intermediate_size) as a fraction of hidden_size.
DEFAULT_NUM_EXPERTS = 4
DEFAULT_NUM_EXPERTS_PER_TOK = 2
DEFAULT_MOE_MLP_DIVISOR = 2

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)

# A deliberately plain template: every chat-aware code path (mlx-lm's `--chat`, servers that
# call `apply_chat_template`) works, and the rendered prompt is easy to assert on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SAFETENSORS_METADATA = {"format": "pt"}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Original prose, written for this module so the tokenizer has something English-shaped to learn
# from. Changing it changes every generated tokenizer (and so every checksum).
CORPUS = """\
The morning train left the station at seven, and the fields outside were still grey with frost.
A woman in the second carriage opened a book about rivers and read the same page three times.
Her brother had written to say that the bridge near the old mill was finally being repaired.
He wanted to know whether she would come home for the summer, or stay in the city again.
She thought about the small kitchen, the smell of bread, and the long table by the window.
In the city there were lights at every corner, but nobody knew the names of the birds.
When the train stopped at the next town, a boy climbed aboard with a basket of apples.
He offered one to everyone in the carriage, and most people smiled and said thank you.

Computers follow instructions one step at a time, yet they can do billions of steps a second.
A program is a list of instructions written in a language that both people and machines read.
When a program runs on many machines at once, each one must know which part of the work is its
own, and they must agree on when the work is done. Messages travel over the network between
them, and every message takes a little time. Good systems are designed so that a slow message
or a missing machine does not ruin the whole result. Engineers write tests to check each piece,
and they measure how long each step takes before they decide what to make faster.

To make a simple soup, cut two onions, three carrots, and a few potatoes into small pieces.
Warm some oil in a large pot, add the onions, and stir them until they are soft and golden.
Add the other vegetables, cover them with water or stock, and let the pot simmer for an hour.
Season it with salt and pepper, taste it, and add a little lemon juice just before serving.
Soup tastes better on the second day, because the flavours have had time to come together.

The weather changed quickly in the mountains. At noon the sky was clear and blue, but by three
o'clock dark clouds had gathered above the northern ridge. The walkers put on their coats and
turned back toward the hut. Rain began to fall, first lightly and then in heavy cold sheets.
They reached the door just as the thunder started, laughing and shaking water from their hats.
Inside, someone had lit the stove, and there was hot tea for everyone who came in from the storm.

Numbers are everywhere: 1, 2, 3, 10, 42, 100, 2024, 3.14, and 0.5 are all ordinary numbers.
A year has 12 months, a week has 7 days, and a day has 24 hours of 60 minutes each.
If you save 5 coins every day for 30 days, you will have 150 coins at the end of the month.

Questions help us learn. Why is the sea salty? How far away is the moon? What makes a song
sad or happy? Who built the first clock, and how did people know the time before clocks?
Some questions have simple answers, and some have answers that take a lifetime to find.
A good teacher does not only give answers; she shows students how to look for them.

The library was quiet except for the sound of pages turning and the soft hum of the lamps.
An old man sat near the window with a map of the coast spread across his knees. He traced
the roads with one finger, stopping at each small village as if he remembered its streets.
Years ago he had walked the whole coast in one long summer, sleeping in barns and fishing huts.
Now he visited it again on paper, slowly, and nobody in the library asked him where he was going.

Gardens need patience. Seeds planted in spring may not flower until the end of summer, and some
trees take many years before they give fruit. A gardener learns to watch the soil, the light,
and the rain, and to accept that some plants will fail no matter how carefully they are tended.
Still, there is great joy in the first green shoots, in fresh tomatoes, and in a bowl of berries
picked on a warm evening while the sun goes down behind the hedge.
"""


@dataclass(frozen=True)
class _Arch:
    """What distinguishes one architecture's checkpoint layout and config from llama's."""

    hf_class: str
    qkv_bias: bool = False
    qk_norm: bool = False
    fused_projections: bool = False
    # Gemma stores RMSNorm scales as an offset from 1 (the model multiplies by 1 + weight).
    norm_offset: bool = False
    sandwich_norms: bool = False
    must_tie: bool = False
    tie_by_default: bool = False
    # Every layer's MLP is a routed mixture of experts, stored per expert as in Hugging Face
    # checkpoints (mlx-lm's sanitize stacks them into one switch_mlp).
    moe: bool = False
    hidden_act: str = "silu"
    rope_theta: float = 10000.0


_ARCHS: dict[str, _Arch] = {
    "llama": _Arch("LlamaForCausalLM"),
    "mistral": _Arch("MistralForCausalLM"),
    "qwen2": _Arch("Qwen2ForCausalLM", qkv_bias=True, rope_theta=1_000_000.0),
    "qwen3": _Arch("Qwen3ForCausalLM", qk_norm=True, rope_theta=1_000_000.0),
    "phi3": _Arch("Phi3ForCausalLM", fused_projections=True),
    "qwen3_moe": _Arch("Qwen3MoeForCausalLM", qk_norm=True, moe=True, rope_theta=1_000_000.0),
    # mlx-lm's gemma has no lm_head at all, so its embeddings are always tied.
    "gemma": _Arch(
        "GemmaForCausalLM",
        norm_offset=True,
        must_tie=True,
        tie_by_default=True,
        hidden_act="gelu_pytorch_tanh",
    ),
    "gemma3_text": _Arch(
        "Gemma3ForCausalLM",
        qk_norm=True,
        norm_offset=True,
        sandwich_norms=True,
        tie_by_default=True,
        hidden_act="gelu_pytorch_tanh",
        rope_theta=1_000_000.0,
    ),
}

SUPPORTED_ARCHS: tuple[str, ...] = tuple(_ARCHS)


@dataclass(frozen=True)
class _Experts:
    """The mixture-of-experts sizes of an MoE model."""

    count: int
    per_token: int
    width: int  # each expert's MLP width (moe_intermediate_size)


# gemma3_text alternates local (sliding-window) and global attention layers; a short window and
# pattern mean even tiny models and short generations exercise both cache types.
_GEMMA3_SLIDING_WINDOW = 32
_GEMMA3_SLIDING_WINDOW_PATTERN = 2

# Weight scales, found by checking that greedy decoding from typical prompts gives varied tokens
# for every architecture, tied and untied (see tests/test_tiny_model.py).
_EMBED_STD = 0.1
_PROJECTION_GAIN = 2.0


def make_tiny_model(
    out_dir: str | os.PathLike[str],
    *,
    arch: str = DEFAULT_ARCH,
    num_layers: int = DEFAULT_NUM_LAYERS,
    hidden_size: int = DEFAULT_HIDDEN_SIZE,
    intermediate_size: int | None = None,
    num_heads: int = DEFAULT_NUM_HEADS,
    num_kv_heads: int = DEFAULT_NUM_KV_HEADS,
    num_experts: int | None = None,
    num_experts_per_tok: int | None = None,
    moe_intermediate_size: int | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    num_shards: int = DEFAULT_NUM_SHARDS,
    seed: int = DEFAULT_SEED,
    tie_embeddings: bool | None = None,
    max_position_embeddings: int = DEFAULT_MAX_POSITION_EMBEDDINGS,
    dtype: str = DEFAULT_DTYPE,
    overwrite: bool = False,
) -> Path:
    """Write a small, deterministic, randomly initialised model that `mlx_lm.load` accepts.

    The directory is built in a hidden `.<name>.*.partial` directory next to `out_dir` and renamed
    into place at the end, so a crashed run never leaves something that looks like a complete
    model (at worst a hidden partial directory). Files are not fsynced: this guards against
    process crashes, not power loss.

    Args:
        out_dir: Directory to create. It must not exist, or be empty, unless `overwrite` is set.
        arch: One of `SUPPORTED_ARCHS`; sets `model_type` and the checkpoint's tensor names.
        num_layers: Number of transformer blocks.
        hidden_size: Model width; must be divisible by `num_heads`.
        intermediate_size: MLP width; defaults to `DEFAULT_MLP_RATIO * hidden_size`.
        num_heads: Attention heads.
        num_kv_heads: Key/value heads; must divide `num_heads`.
        num_experts: Experts per layer, for MoE architectures only; defaults to
            `DEFAULT_NUM_EXPERTS`.
        num_experts_per_tok: Experts each token is routed to (MoE only); defaults to
            `DEFAULT_NUM_EXPERTS_PER_TOK`.
        moe_intermediate_size: Each expert's MLP width (MoE only); defaults to
            `hidden_size // DEFAULT_MOE_MLP_DIVISOR`.
        vocab_size: Size of the trained tokenizer and of the embedding matrix.
        num_shards: Number of safetensors files. Embeddings go in the first, the final norm and
            `lm_head` in the last, and the layers in contiguous blocks in between, as in real
            sharded checkpoints. 1 writes a single `model.safetensors` without an index.
        seed: Seed for the weights. Each tensor is drawn from its own generator, seeded by `seed`
            and the tensor's name, so the same seed gives the same tensors whatever
            `num_shards` is.
        tie_embeddings: Reuse the embedding matrix as the output projection (no `lm_head`).
            Defaults to the architecture's habit: tied for gemma models, untied otherwise.
        max_position_embeddings: Longest context the config advertises.
        dtype: One of `DTYPES`. In 16-bit models the norm weights and MoE routers stay
            float32 (mixed precision, as in many real checkpoints).
        overwrite: Replace an existing non-empty `out_dir`.

    Returns:
        The path of the finished model directory.

    Raises:
        ValueError: If the architecture is unknown, the sizes do not fit together, or expert
            sizes are given for a model without experts.
        FileExistsError: If `out_dir` holds files and `overwrite` is false.
    """
    out = Path(out_dir)
    spec = _ARCHS.get(arch)
    if spec is None:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(SUPPORTED_ARCHS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if tie_embeddings is None:
        tie_embeddings = spec.tie_by_default
    if spec.must_tie and not tie_embeddings:
        raise ValueError(f"{arch} always ties its embeddings; drop tie_embeddings=False")
    if intermediate_size is None:
        intermediate_size = DEFAULT_MLP_RATIO * hidden_size
    experts = _resolve_experts(
        arch,
        spec,
        hidden_size=hidden_size,
        num_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok,
        moe_intermediate_size=moe_intermediate_size,
    )
    _check_sizes(
        arch=arch,
        num_layers=num_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        vocab_size=vocab_size,
        num_shards=num_shards,
    )
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True to replace it")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        # mkdtemp creates 0700; a model directory should be readable like any other.
        tmp.chmod(0o755)
        tokenizer = _train_tokenizer(vocab_size, model_max_length=max_position_embeddings)
        head_dim = hidden_size // num_heads
        config = _config(
            arch,
            spec,
            num_layers=num_layers,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            experts=experts,
            vocab_size=vocab_size,
            tie_embeddings=tie_embeddings,
            max_position_embeddings=max_position_embeddings,
            dtype=dtype,
        )
        for name, text in {**tokenizer.files, "config.json": _dump_json(config)}.items():
            (tmp / name).write_text(text, encoding="utf-8")
        shapes = _tensor_shapes(
            spec,
            num_layers=num_layers,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            experts=experts,
            vocab_size=vocab_size,
            tie_embeddings=tie_embeddings,
        )
        _write_weights(
            tmp,
            shapes,
            spec,
            num_layers=num_layers,
            num_shards=num_shards,
            seed=seed,
            silenced_ids=tokenizer.silenced_ids,
            dtype=dtype,
        )
        _move_into_place(tmp, out, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote tiny %s model to %s", arch, out)
    return out


def _resolve_experts(
    arch: str,
    spec: _Arch,
    *,
    hidden_size: int,
    num_experts: int | None,
    num_experts_per_tok: int | None,
    moe_intermediate_size: int | None,
) -> _Experts | None:
    given = (num_experts, num_experts_per_tok, moe_intermediate_size)
    if not spec.moe:
        if any(v is not None for v in given):
            raise ValueError(f"{arch} has no experts; drop the num_experts* and moe_* sizes")
        return None
    experts = _Experts(
        count=DEFAULT_NUM_EXPERTS if num_experts is None else num_experts,
        per_token=DEFAULT_NUM_EXPERTS_PER_TOK
        if num_experts_per_tok is None
        else num_experts_per_tok,
        width=(
            hidden_size // DEFAULT_MOE_MLP_DIVISOR
            if moe_intermediate_size is None
            else moe_intermediate_size
        ),
    )
    if experts.width < 1:
        raise ValueError(f"moe_intermediate_size must be at least 1, got {experts.width}")
    if not 1 <= experts.per_token <= experts.count:
        raise ValueError(
            f"num_experts_per_tok must be between 1 and num_experts {experts.count}, "
            f"got {experts.per_token}"
        )
    return experts


def _check_sizes(
    *,
    arch: str,
    num_layers: int,
    hidden_size: int,
    intermediate_size: int,
    num_heads: int,
    num_kv_heads: int,
    vocab_size: int,
    num_shards: int,
) -> None:
    for name, value in {
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "num_shards": num_shards,
    }.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not divisible by num_kv_heads {num_kv_heads}")
    if (hidden_size // num_heads) % 2:
        raise ValueError("hidden_size // num_heads must be even for rotary embeddings")
    if num_shards > num_layers:
        raise ValueError(
            f"num_shards {num_shards} exceeds num_layers {num_layers}; every shard holds at "
            "least one layer"
        )
    if arch == "gemma3_text" and num_layers < _GEMMA3_SLIDING_WINDOW_PATTERN:
        raise ValueError(
            f"gemma3_text needs at least {_GEMMA3_SLIDING_WINDOW_PATTERN} layers "
            "(one local and one global attention layer)"
        )
    min_vocab = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise ValueError(
            f"vocab_size must be at least {min_vocab} (256 byte tokens and "
            f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}"
        )


def _dump_json(obj: object) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# --- tokenizer ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TrainedTokenizer:
    files: dict[str, str]
    # Token ids whose output logits are zeroed: special and reserved tokens, and lone bytes that
    # do not decode to printable text, so a random model's greedy output reads as text.
    silenced_ids: tuple[int, ...]


def _train_tokenizer(vocab_size: int, *, model_max_length: int) -> _TrainedTokenizer:
    """Train a byte-level BPE tokenizer on `CORPUS`, padded with reserved tokens to vocab_size."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    learned = tokenizer.get_vocab_size()
    # The corpus runs out of merges near a thousand tokens; real checkpoints also pad their
    # vocabularies with reserved tokens (llama 3's <|reserved_special_token_N|>).
    tokenizer.add_special_tokens([f"<|reserved_{n}|>" for n in range(vocab_size - learned)])
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # Like llama: encoding a plain prompt prepends BOS, so raw and chat prompts look alike.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    silenced = []
    for token_id in range(vocab_size):
        text = tokenizer.decode([token_id])
        # A lone byte of a multi-byte character decodes to U+FFFD, which counts as printable.
        printable = all((c.isprintable() and c != "\ufffd") or c == "\n" for c in text)
        if not text or not printable:
            silenced.append(token_id)

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    special_tokens_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    files = {
        # Re-indent through json so the bytes do not depend on the tokenizers pretty-printer.
        "tokenizer.json": _dump_json(json.loads(tokenizer.to_str())),
        "tokenizer_config.json": _dump_json(tokenizer_config),
        "special_tokens_map.json": _dump_json(special_tokens_map),
    }
    return _TrainedTokenizer(files=files, silenced_ids=tuple(silenced))


# --- config ------------------------------------------------------------------------------------


def _config(
    arch: str,
    spec: _Arch,
    *,
    num_layers: int,
    hidden_size: int,
    intermediate_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    experts: _Experts | None,
    vocab_size: int,
    tie_embeddings: bool,
    max_position_embeddings: int,
    dtype: str,
) -> dict[str, object]:
    config: dict[str, object] = {
        "architectures": [spec.hf_class],
        "model_type": arch,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": spec.rope_theta,
        "hidden_act": spec.hidden_act,
        "tie_word_embeddings": tie_embeddings,
        "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
        "bos_token_id": SPECIAL_TOKENS.index(BOS_TOKEN),
        "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
        "torch_dtype": dtype,
        "use_cache": True,
        "initializer_range": 0.02,
    }
    if arch in ("llama", "qwen3", "qwen3_moe"):
        config["attention_bias"] = False
    if arch == "llama":
        config["mlp_bias"] = False
    if arch in ("mistral", "qwen2"):
        config["sliding_window"] = None
    if experts is not None:
        config.update(
            num_experts=experts.count,
            num_experts_per_tok=experts.per_token,
            moe_intermediate_size=experts.width,
            # Every layer routes; intermediate_size would size dense layers, of which there
            # are none.
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
            router_aux_loss_coef=0.001,
            output_router_logits=False,
        )
    if arch == "phi3":
        config["original_max_position_embeddings"] = max_position_embeddings
        config["rope_scaling"] = None
    if arch in ("gemma", "gemma3_text"):
        config["hidden_activation"] = spec.hidden_act
    if arch == "gemma3_text":
        pattern = _GEMMA3_SLIDING_WINDOW_PATTERN
        config.update(
            # Real checkpoints use head_dim. With q/k norms and a norm after attention, that
            # gives flat attention whose normalised output is nearly the same vector at every
            # position, and greedy output that repeats; sharper attention keeps it varied.
            query_pre_attn_scalar=1,
            sliding_window=_GEMMA3_SLIDING_WINDOW,
            sliding_window_pattern=pattern,
            rope_local_base_freq=10000.0,
            attn_logit_softcapping=None,
            final_logit_softcapping=None,
            layer_types=[
                "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                for i in range(num_layers)
            ],
        )
    return config


# --- weights -----------------------------------------------------------------------------------


def _tensor_shapes(
    spec: _Arch,
    *,
    num_layers: int,
    hidden_size: int,
    intermediate_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    experts: _Experts | None,
    vocab_size: int,
    tie_embeddings: bool,
) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names and shapes, in checkpoint order (embeddings first)."""
    h, i = hidden_size, intermediate_size
    q_out, kv_out = num_heads * head_dim, num_kv_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab_size, h)}
    for n in range(num_layers):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = (h,)
        if spec.fused_projections:
            shapes[p + "self_attn.qkv_proj.weight"] = (q_out + 2 * kv_out, h)
        else:
            shapes[p + "self_attn.q_proj.weight"] = (q_out, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv_out, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv_out, h)
        if spec.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_out,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_out,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_out,)
        if spec.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (head_dim,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q_out)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if spec.sandwich_norms:
            shapes[p + "pre_feedforward_layernorm.weight"] = (h,)
            shapes[p + "post_feedforward_layernorm.weight"] = (h,)
        if experts is not None:
            # The router, then each expert's own MLP, as Hugging Face checkpoints store them.
            shapes[p + "mlp.gate.weight"] = (experts.count, h)
            for e in range(experts.count):
                shapes[p + f"mlp.experts.{e}.gate_proj.weight"] = (experts.width, h)
                shapes[p + f"mlp.experts.{e}.up_proj.weight"] = (experts.width, h)
                shapes[p + f"mlp.experts.{e}.down_proj.weight"] = (h, experts.width)
        elif spec.fused_projections:
            shapes[p + "mlp.gate_up_proj.weight"] = (2 * i, h)
            shapes[p + "mlp.down_proj.weight"] = (h, i)
        else:
            shapes[p + "mlp.gate_proj.weight"] = (i, h)
            shapes[p + "mlp.up_proj.weight"] = (i, h)
            shapes[p + "mlp.down_proj.weight"] = (h, i)
    shapes["model.norm.weight"] = (h,)
    if not tie_embeddings:
        shapes["lm_head.weight"] = (vocab_size, h)
    return shapes


def _tensor(
    name: str,
    shape: tuple[int, ...],
    spec: _Arch,
    *,
    seed: int,
    silenced_ids: Sequence[int] = (),
) -> np.ndarray:
    """One tensor's values, seeded by (seed, name) so they do not depend on file layout.

    `silenced_ids` are rows to zero; the caller passes them for the output matrix only.
    """
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    values = rng.standard_normal(shape, dtype=np.float32)
    if name.endswith("norm.weight"):
        # Close to the identity, but not exactly, so a norm loaded into the wrong layer changes
        # the output.
        values *= np.float32(0.1)
        if not spec.norm_offset:
            values += np.float32(1.0)
    elif name.endswith(".bias"):
        values *= np.float32(0.1)
    elif name == "model.embed_tokens.weight":
        # Small next to what the layers add, so the output is not just the input token echoed
        # back through tied embeddings.
        values *= np.float32(_EMBED_STD)
        if spec.norm_offset:
            # Gemma multiplies embeddings by sqrt(hidden_size); cancel it so all architectures
            # start the residual stream at the same magnitude.
            values /= np.float32(np.sqrt(shape[1]))
    else:
        # Projections and lm_head: std gain/sqrt(fan_in), so every layer visibly changes the
        # residual stream and greedy output wanders instead of collapsing onto one token.
        values *= np.float32(_PROJECTION_GAIN / np.sqrt(shape[1]))
    # A zero row gives a zero logit, below the best of hundreds of random ones, so greedy
    # decoding never stops early at EOS or emits unprintable bytes.
    values[list(silenced_ids)] = 0.0
    return values


def _layer_of(name: str) -> int | None:
    if name.startswith("model.layers."):
        return int(name.split(".")[2])
    return None


def _shard_of(name: str, *, num_layers: int, num_shards: int) -> int:
    layer = _layer_of(name)
    if layer is not None:
        # Contiguous, near-equal blocks: pipeline ranks then need different files.
        return layer * num_shards // num_layers
    if name == "model.embed_tokens.weight":
        return 0
    return num_shards - 1


def _write_weights(
    directory: Path,
    shapes: dict[str, tuple[int, ...]],
    spec: _Arch,
    *,
    num_layers: int,
    num_shards: int,
    seed: int,
    silenced_ids: Sequence[int],
    dtype: str,
) -> None:
    if num_shards == 1:
        filenames = [SINGLE_FILE]
    else:
        filenames = [
            f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors" for k in range(num_shards)
        ]
    output_name = "lm_head.weight" if "lm_head.weight" in shapes else "model.embed_tokens.weight"
    groups: list[dict[str, tuple[int, ...]]] = [{} for _ in filenames]
    for name, shape in shapes.items():
        groups[_shard_of(name, num_layers=num_layers, num_shards=num_shards)][name] = shape

    weight_map: dict[str, str] = {}
    total_size = 0
    for filename, group in zip(filenames, groups, strict=True):
        arrays = {
            name: _stored(
                name,
                _tensor(
                    name,
                    shape,
                    spec,
                    seed=seed,
                    silenced_ids=silenced_ids if name == output_name else (),
                ),
                dtype,
            )
            for name, shape in group.items()
        }
        mx.save_safetensors(str(directory / filename), arrays, metadata=SAFETENSORS_METADATA)
        for name, array in arrays.items():
            weight_map[name] = filename
            total_size += array.nbytes
    if num_shards > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(_dump_json(index), encoding="utf-8")


def _stored(name: str, values: np.ndarray, dtype: str) -> mx.array:
    """A tensor in its storage dtype: norm scales and MoE routers stay float32, the rest
    takes `dtype`."""
    array = mx.array(values)
    if name.endswith(("norm.weight", ".mlp.gate.weight")):
        return array
    return array.astype(getattr(mx, dtype))


def _move_into_place(tmp: Path, out: Path, *, overwrite: bool) -> None:
    if out.exists() and overwrite and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        out.rename(old / out.name)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        # rename() replaces an empty directory atomically and refuses a non-empty one, so of
        # two concurrent writers exactly one wins.
        tmp.rename(out)
    except OSError as e:
        if out.is_dir() and any(out.iterdir()):
            raise FileExistsError(f"{out} appeared while the model was being written") from e
        raise


# --- CLI ---------------------------------------------------------------------------------------


def setup_arg_parser() -> argparse.ArgumentParser:
    """The `python -m tests.support.tiny_model` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.tiny_model",
        description="Write a deterministic tiny Hugging-Face-style model that mlx_lm.load accepts.",
    )
    parser.add_argument("out_dir", type=Path, help="Directory to create for the model.")
    parser.add_argument(
        "--arch",
        choices=SUPPORTED_ARCHS,
        default=DEFAULT_ARCH,
        help=f"Model architecture (default: {DEFAULT_ARCH}).",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=DEFAULT_NUM_LAYERS,
        help=f"Number of transformer layers (default: {DEFAULT_NUM_LAYERS}).",
    )
    parser.add_argument(
        "--hidden-size",
        type=int,
        default=DEFAULT_HIDDEN_SIZE,
        help=f"Model width (default: {DEFAULT_HIDDEN_SIZE}).",
    )
    parser.add_argument(
        "--intermediate-size",
        type=int,
        default=None,
        help=f"MLP width (default: {DEFAULT_MLP_RATIO} x hidden size).",
    )
    parser.add_argument(
        "--heads",
        type=int,
        default=DEFAULT_NUM_HEADS,
        help=f"Attention heads (default: {DEFAULT_NUM_HEADS}).",
    )
    parser.add_argument(
        "--kv-heads",
        type=int,
        default=DEFAULT_NUM_KV_HEADS,
        help=f"Key/value heads (default: {DEFAULT_NUM_KV_HEADS}).",
    )
    parser.add_argument(
        "--experts",
        type=int,
        default=None,
        help=f"Experts per layer, MoE architectures only (default: {DEFAULT_NUM_EXPERTS}).",
    )
    parser.add_argument(
        "--experts-per-token",
        type=int,
        default=None,
        help=f"Experts each token is routed to, MoE only (default: {DEFAULT_NUM_EXPERTS_PER_TOK}).",
    )
    parser.add_argument(
        "--moe-intermediate-size",
        type=int,
        default=None,
        help=f"Each expert's MLP width, MoE only "
        f"(default: hidden size / {DEFAULT_MOE_MLP_DIVISOR}).",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        help=f"Tokenizer and embedding size (default: {DEFAULT_VOCAB_SIZE}).",
    )
    parser.add_argument(
        "--shards",
        type=int,
        default=DEFAULT_NUM_SHARDS,
        help=f"Safetensors files to split the weights over; 1 means no index "
        f"(default: {DEFAULT_NUM_SHARDS}).",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help=f"Seed for the random weights (default: {DEFAULT_SEED}).",
    )
    tie = parser.add_mutually_exclusive_group()
    tie.add_argument(
        "--tie-embeddings",
        dest="tie_embeddings",
        action="store_true",
        default=None,
        help="Reuse the embeddings as the output layer (default: tied for gemma models only).",
    )
    tie.add_argument(
        "--no-tie-embeddings",
        dest="tie_embeddings",
        action="store_false",
        help="Write a separate lm_head even where the architecture usually ties it.",
    )
    parser.add_argument(
        "--max-position-embeddings",
        type=int,
        default=DEFAULT_MAX_POSITION_EMBEDDINGS,
        help=f"Context length in config.json (default: {DEFAULT_MAX_POSITION_EMBEDDINGS}).",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=DEFAULT_DTYPE,
        help=f"Storage dtype; 16-bit models keep float32 norms (default: {DEFAULT_DTYPE}).",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace OUT_DIR if it already holds files.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; print the model directory on success and return the exit code."""
    args = setup_arg_parser().parse_args(argv)
    try:
        path = make_tiny_model(
            args.out_dir,
            arch=args.arch,
            num_layers=args.layers,
            hidden_size=args.hidden_size,
            intermediate_size=args.intermediate_size,
            num_heads=args.heads,
            num_kv_heads=args.kv_heads,
            num_experts=args.experts,
            num_experts_per_tok=args.experts_per_token,
            moe_intermediate_size=args.moe_intermediate_size,
            vocab_size=args.vocab_size,
            num_shards=args.shards,
            seed=args.seed,
            tie_embeddings=args.tie_embeddings,
            max_position_embeddings=args.max_position_embeddings,
            dtype=args.dtype,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
