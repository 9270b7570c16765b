"""A pipeline split for decoder-only mlx-lm models that have no `pipeline()` of their own.

mlx-lm's `PipelineMixin` models (qwen2, deepseek, ...) rewrite their forward pass to pass the
hidden state between ranks. Every other architecture keeps its own forward pass here: only the
entries of `model.model.layers` are replaced, so masks, sliding windows, embedding scales,
final norms and logit soft-caps keep working as the model wrote them. Rank r holds layers
[start, end) from `sharding.layer_range` (rank 0 the last ones) and its layer list becomes:

- a layer another rank holds: a weightless `_PipelineSlot` that passes the hidden state on
  and feeds its KV cache a one-wide dummy entry, so the cache's offset and padding (which the
  model reads to build masks, often from `cache[0]`) advance exactly as a real layer's would;
- the first local layer: first receives the hidden state from rank r + 1 (unless it holds
  layer 0);
- the last local layer: sends its output to rank r - 1 (unless r is 0) and makes its cache
  depend on the send, since prompt prefill evaluates only the caches.

Logits once: only rank 0, which holds the last layers, normalises, projects to the vocabulary
and samples. `drop_head` gives every other rank a weightless stand-in for the head (final norm
and lm_head, or a tied embedding's projection) whose "logits" are zeros that wait for the
rank's own sends, so those ranks neither compute nor load the head; `TokenSharing` wraps the
samplers so that rank 0 samples from its real logits and one all-sum of int32 token ids (the
other ranks add zeros) gives every rank the same tokens for the next step. mlx-lm's own
`pipeline()` models get the same head and samplers; their forward pass still all-gathers the
hidden state, as mlx-lm wrote it.

Backends without send/recv (NCCL in MLX 0.32, see `distributed.point_to_point`) pass the
hidden state with collectives instead: at the first layer of each rank k < size - 1, every
rank takes part in one all-sum to which only rank k + 1 (the sender) contributes its hidden
state and the others zeros, so every rank comes out holding the sender's values exactly
(x + 0 is x). The relayed state flows on through each rank's placeholders into the next
hop, which keeps the hops in one order on every rank, and each hop's result feeds the slot's
KV cache, so a prefill that evaluates only the caches still takes part in every hop. It costs
every rank each hop's traffic (an all-reduce instead of one copy), which on two ranks is the
same amount.

What travels between ranks must be known exactly on both sides: a receiving rank sizes its
buffer from the shape and dtype it expects, and real checkpoints are often mixed precision
(float32 norms next to 16-bit weights make a layer's output float32 while its input, the
embedding, is 16-bit). So after wiring, `agree_on_wire` traces every rank's forward pass
lazily, without running it or touching the network, in pipeline order (the rank holding layer
0 first), and tells each rank the dtype its sender's layers produce. The same trace serves
mlx-lm's own `pipeline()` models, whose `recv_like` takes the dtype of the embedding: on the
ranks that do not hold layer 0 the embedding only sets the receive buffer's shape, so it is
cast to what the sender sends.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import greedy_sampler

from . import distributed
from .errors import ModelLoadError
from .sharding import layer_range

logger = logging.getLogger(__name__)

# Attributes every nn.Module sets for itself; not copied onto placeholders.
_MODULE_INTERNALS = ("_no_grad", "_training")

# True while `agree_on_wire` traces a forward pass: slots then use send/recv (recorded, never
# run) even where the backend relays with collectives, so the trace sees what travels.
_tracing = False


class _PipelineSlot(nn.Module):
    """One layer position on one rank: a local layer with send/recv around it, or a stand-in."""

    def __init__(
        self,
        layer: nn.Module,
        *,
        local: bool,
        cache_position: int,
        group: mx.distributed.Group,
        recv_from: int | None = None,
        send_to: int | None = None,
        relay_from: int | None = None,
        sends: bool = True,
    ):
        super().__init__()
        if local:
            self.layer = layer
        else:
            # Keep the layer's plain attributes (use_sliding, layer_type...) that the model's
            # own code reads, but none of its weights.
            for key, value in vars(layer).items():
                if key not in _MODULE_INTERNALS:
                    object.__setattr__(self, key, value)
        self._cache_position = cache_position
        self._group = group
        self._recv_from = recv_from
        self._send_to = send_to
        # Backends without send/recv: the rank whose hidden state every rank relays here
        # (send_to and recv_from then only describe the pipeline to `agree_on_wire`'s trace).
        self._relay_from = relay_from
        self._sends = sends
        self._hops = distributed.hop_stream()
        # Set by `agree_on_wire`: the dtype the sender's layers produce, and the relayed
        # rank's output dtype, which every rank's all-sum contribution must share.
        self.recv_dtype: mx.Dtype | None = None
        self.relay_dtype: mx.Dtype | None = None

    def __getattr__(self, key: str) -> Any:
        if key in self:
            return self[key]
        layer = self.get("layer")
        if layer is not None:
            return getattr(layer, key)
        raise AttributeError(f"{type(self).__name__} has no attribute {key!r}")

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        cache = kwargs.get("cache")
        if "cache" not in kwargs and self._cache_position < len(args):
            cache = args[self._cache_position]
        relayed = None
        if self._relay_from is not None and not _tracing:
            x = relayed = self._relay_hop(x)
        elif self._recv_from is not None:
            dtype = self.recv_dtype or x.dtype
            x = mx.distributed.recv(
                x.shape, dtype, self._recv_from, group=self._group, stream=self._hops
            )
        layer = self.get("layer")
        if layer is not None:
            h = layer(x, *args, **kwargs)
        else:
            h = x
            if cache is not None:
                dummy = mx.zeros((x.shape[0], 1, x.shape[1], 1), dtype=x.dtype)
                cache.update_and_fetch(dummy, dummy)
        if relayed is not None and cache is not None:
            cache.keys = mx.depends(cache.keys, relayed)
        if self._send_to is not None and (self._sends or _tracing):
            h = mx.distributed.send(h, self._send_to, group=self._group, stream=self._hops)
            if cache is not None:
                cache.keys = mx.depends(cache.keys, h)
        return h

    def _relay_hop(self, x: mx.array) -> mx.array:
        """The sender's hidden state on every rank, from an all-sum it alone contributes to."""
        dtype = self.relay_dtype or x.dtype
        if self._group.rank() == self._relay_from:
            mine = x.astype(dtype)
        else:
            # Zeros that wait for x: every rank then runs the hops in the same order.
            mine = mx.depends(mx.zeros(x.shape, dtype=dtype), x)
        return mx.distributed.all_sum(mine, group=self._group)


class _Wrapper(nn.Module):
    """A module around `inner`: what the subclass does not define reaches the wrapped one."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def __getattr__(self, key: str) -> Any:
        if key in self:
            return self[key]
        inner = self.get("inner")
        if inner is None:
            raise AttributeError(f"{type(self).__name__} has no attribute {key!r}")
        return getattr(inner, key)

    def __call__(self, *args: Any, **kwargs: Any) -> mx.array:
        return self.inner(*args, **kwargs)


class _CastOutput(_Wrapper):
    """A module whose output is cast to `dtype`."""

    def __init__(self, inner: nn.Module, dtype: mx.Dtype):
        super().__init__(inner)
        self._dtype = dtype

    def __call__(self, *args: Any, **kwargs: Any) -> mx.array:
        return self.inner(*args, **kwargs).astype(self._dtype)


def generic_pipeline_problem(model: nn.Module) -> str | None:
    """Why the generic wrapper cannot split `model`, or None when it can."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None) if inner is not None else None
    if not isinstance(layers, list) or not layers:
        return "it has no `model.layers` list of decoder blocks"
    # mlx-lm's PipelineMixin models expose a slice of the same blocks (`pipeline_layers`).
    outer = getattr(model, "layers", layers)
    if outer is not layers and (
        not isinstance(outer, list)
        or len(outer) != len(layers)
        or any(a is not b for a, b in zip(outer, layers, strict=True))
    ):
        return "its `layers` are not the decoder blocks of `model.model.layers`"
    for layer in layers:
        if not isinstance(layer, nn.Module) or _cache_position(layer) is None:
            return f"its {type(layer).__name__} blocks do not take a `cache` argument"
    caches = make_prompt_cache(model)
    if len(caches) != len(layers):
        return "its cache does not have one entry per layer"
    for cache in caches:
        if not hasattr(cache, "update_and_fetch") or not hasattr(cache, "keys"):
            return f"it keeps a {type(cache).__name__} (not a KV cache) for some layers"
    return None


def apply_pipeline(
    model: nn.Module,
    group: mx.distributed.Group,
    split: list[int],
    *,
    point_to_point: bool | None = None,
) -> None:
    """Keep this rank's layers of `split` (layers per rank) and wire it to its neighbours.

    Works in place. Call before the weights are evaluated: the layers this rank drops are
    never materialised. `point_to_point` (default: what the joined backend has, see
    `distributed.point_to_point`) picks send/recv or collectives for the hops between ranks.

    Raises:
        ValueError: the model does not fit the wrapper (see `generic_pipeline_problem`).
    """
    problem = generic_pipeline_problem(model)
    if problem is not None:
        raise ValueError(problem)
    if point_to_point is None:
        point_to_point = distributed.point_to_point()
    layers = model.model.layers
    rank, size = group.rank(), group.size()
    start, end = layer_range(len(layers), rank, size, split=split)
    # The hop from rank k + 1 to rank k comes before rank k's first layer; without send/recv
    # every rank takes part in it there.
    relays = (
        {}
        if point_to_point
        else {layer_range(len(layers), k, size, split=split)[0]: k + 1 for k in range(size - 1)}
    )
    if relays and rank == 0:
        logger.info("pipeline hops: all-sums over the group (no send/recv on this backend)")
    for index, layer in enumerate(layers):
        local = start <= index < end
        recv_from = rank + 1 if index == start and rank < size - 1 else None
        send_to = rank - 1 if index == end - 1 and rank > 0 else None
        relay_from = relays.get(index)
        if local and recv_from is None and send_to is None and relay_from is None:
            continue  # an interior layer runs untouched
        layers[index] = _PipelineSlot(
            layer,
            local=local,
            cache_position=_cache_position(layer),
            group=group,
            recv_from=recv_from,
            send_to=send_to,
            relay_from=relay_from,
            sends=point_to_point,
        )


def _cache_position(layer: nn.Module) -> int | None:
    """Index of the `cache` argument among the positional arguments after the hidden state."""
    try:
        params = list(inspect.signature(type(layer).__call__).parameters)
    except (TypeError, ValueError):
        return None
    if "cache" not in params:
        return None
    # parameters are (self, x, ...): the position counts from the argument after x.
    return params.index("cache") - 2


# -- logits once: the head and the sampling on rank 0 only

# The rank that holds the last layers (sharding's convention), and so the only one that
# projects to the vocabulary and samples.
SAMPLING_RANK = 0


class _NoLogits(nn.Module):
    """The head of a rank that does not sample: zeros shaped like the logits.

    They cost no memory (a broadcast scalar) and wait for the hidden state, so evaluating
    a step's token still runs this rank's layers and their sends.
    """

    def __init__(self, vocab_size: int):
        super().__init__()
        self._vocab_size = vocab_size

    def __call__(self, x: mx.array) -> mx.array:
        zeros = mx.broadcast_to(mx.zeros((1,), dtype=x.dtype), (*x.shape[:-1], self._vocab_size))
        return mx.depends(zeros, x)


class _EmbeddingWithoutHead(_Wrapper):
    """A tied embedding that still embeds but whose projection (`as_linear`) is `_NoLogits`."""

    def __init__(self, inner: nn.Module):
        super().__init__(inner)
        self.head = _NoLogits(inner.weight.shape[0])

    def as_linear(self, x: mx.array) -> mx.array:
        return self.head(x)


def drop_head(model: nn.Module, rank: int) -> None:
    """Give a rank other than `SAMPLING_RANK` a weightless head; call before evaluating weights.

    The final norm (`model.model.norm`) becomes an identity and the projection to the
    vocabulary (`model.lm_head`, or a tied embedding's `as_linear`) a `_NoLogits`, so these
    weights are never read (`sharding.files_for_layers` does not fetch them) and no rank but
    rank 0 multiplies by the vocabulary. A head of another shape stays as it is: its logits
    are wasted work but harmless, since `TokenSharing` takes every token from rank 0.
    """
    if rank == SAMPLING_RANK:
        return
    inner = model.model
    if isinstance(getattr(inner, "norm", None), nn.Module):
        inner.norm = nn.Identity()
    head = getattr(model, "lm_head", None)
    embedding = getattr(inner, "embed_tokens", None)
    if isinstance(head, nn.Module) and hasattr(head, "weight"):
        model.lm_head = _NoLogits(head.weight.shape[0])
    elif hasattr(embedding, "as_linear") and hasattr(embedding, "weight"):
        inner.embed_tokens = _EmbeddingWithoutHead(embedding)
    else:
        logger.debug(
            "rank %d keeps the head: %s has no lm_head or tied embedding",
            rank,
            type(model).__name__,
        )


def head_weight(model: nn.Module) -> mx.array | None:
    """The matrix this rank projects to the vocabulary with; None where it does not (a
    stand-in from `drop_head`, or a head this module does not recognise)."""
    head = getattr(model, "lm_head", None)
    if head is not None:
        return getattr(head, "weight", None)
    embedding = getattr(getattr(model, "model", None), "embed_tokens", None)
    if isinstance(embedding, _EmbeddingWithoutHead) or not hasattr(embedding, "as_linear"):
        return None
    return getattr(embedding, "weight", None)


Sampler = Callable[[mx.array], mx.array]


class TokenSharing:
    """Samplers that sample on `SAMPLING_RANK` and give every rank its token ids.

    A shared sampler runs the real one on rank 0 (the only rank with real logits, see
    `drop_head`) and puts its ids into an all-sum of int32 to which the other ranks add
    zeros, so every rank feeds the same tokens into its next step, whatever the sampler's
    randomness. One instance serves one generator: a step that calls several samplers
    (requests that sample differently) chains their all-sums, so every rank runs them in
    the same order.
    """

    def __init__(self, group: mx.distributed.Group, *, stream: Any = None):
        self._group = group
        self._stream = stream  # where the all-sums run (None: the default stream)
        self._samples = group.rank() == SAMPLING_RANK
        self._previous: mx.array | None = None  # the last all-sum, which the next waits for

    def share(self, sampler: Sampler | None) -> Sampler:
        """`sampler` (None: greedy) made to sample on rank 0 for every rank."""
        inner = sampler or greedy_sampler

        def shared(logprobs: mx.array) -> mx.array:
            return self._all_sum(inner, logprobs)

        return shared

    def _all_sum(self, sampler: Sampler, logprobs: mx.array) -> mx.array:
        if self._samples:
            mine = sampler(logprobs).astype(mx.int32)
        else:
            # Zeros that wait for the logits' stand-in, and so for this rank's sends.
            mine = mx.depends(mx.zeros(logprobs.shape[:-1], dtype=mx.int32), logprobs)
        if self._previous is not None:
            mine = mx.depends(mine, self._previous)
        self._previous = mx.distributed.all_sum(mine, group=self._group, stream=self._stream)
        return self._previous


# -- agreeing on what travels between ranks


def agree_on_wire(model: nn.Module, group: mx.distributed.Group) -> list[mx.Dtype | None]:
    """Tell every rank the dtype of the hidden state its sender sends; call after wiring.

    Works for the generic wrapper and for mlx-lm's own `pipeline()`. Ranks take turns from
    the one holding layer 0 (rank size - 1) down to rank 0: each traces its forward pass with
    the dtype it will receive and shares the dtype its layers put out.

    Returns:
        The dtype each rank's layers put out on the wire, in rank order; None for rank 0 of
        the generic wrapper, whose output goes only into its own head.

    Raises:
        ModelLoadError: the trace fails, the hidden state changes shape between ranks, or
            mlx-lm's `pipeline()` would gather different dtypes from different ranks.
        DistributedSetupError: a peer went away or the ranks fell out of step.
    """
    rank, size = group.rank(), group.size()
    traces: list[dict[str, Any]] = [{}] * size
    for turn in range(size - 1, -1, -1):
        mine = None
        if rank == turn:
            incoming = _dtype(traces[rank + 1]["dtype"]) if rank + 1 < size else None
            mine = _trace(model, incoming)
        shared = distributed.all_gather_json(group, mine, what="agreeing on the pipeline's dtypes")
        traces[turn] = shared[turn]
    _check_shapes(traces)
    silent = [r for r in range(1, size) if traces[r]["dtype"] is None]
    if silent:
        raise ModelLoadError(f"rank {silent[0]}'s forward pass neither sends nor gathers")
    dtypes = [_dtype(t["dtype"]) for t in traces]
    incoming = dtypes[rank + 1] if rank + 1 < size else None
    slots = [layer for layer in model.model.layers if isinstance(layer, _PipelineSlot)]
    if not slots:  # mlx-lm's own pipeline()
        _wire_own_pipeline(model, dtypes, incoming)
    for slot in slots:
        slot.recv_dtype = incoming
        if slot._relay_from is not None:
            slot.relay_dtype = dtypes[slot._relay_from]
    return dtypes


def _check_shapes(traces: list[dict[str, Any]]) -> None:
    """Every receiver's buffer must have the shape its sender sends (same on every rank)."""
    for rank in range(len(traces) - 1):
        sent, expected = traces[rank + 1]["shape"], traces[rank]["recv_shape"]
        if expected is not None and sent != expected:
            raise ModelLoadError(
                f"the hidden state changes shape between layers (rank {rank + 1} sends "
                f"{tuple(sent)}, rank {rank} expects {tuple(expected)}); this model cannot "
                "be split into a pipeline"
            )


def _wire_own_pipeline(model: nn.Module, dtypes: list[mx.Dtype | None], incoming: mx.Dtype | None):
    """mlx-lm's forward gathers each rank's own output and receives into the embedding's dtype."""
    if len(set(dtypes)) > 1:
        names = ", ".join(f"rank {r}: {_name(d)}" for r, d in enumerate(dtypes))
        raise ModelLoadError(
            f"mlx-lm's pipeline() for {model.model_type} would gather hidden states of "
            f"different dtypes ({names}); use --strategy tensor or a checkpoint in one dtype"
        )
    if incoming is not None:
        model.model.embed_tokens = _CastOutput(model.model.embed_tokens, incoming)


def _trace(model: nn.Module, incoming: mx.Dtype | None) -> dict[str, Any]:
    """What this rank's layers send or gather, from a lazy forward pass that nothing evaluates."""
    with _recording_collectives(incoming) as seen:
        try:
            model(mx.array([[0]], dtype=mx.int32), cache=make_prompt_cache(model))
        except Exception as e:  # any failure of a model's own code: name it, never crash
            raise ModelLoadError(
                f"cannot trace {getattr(model, 'model_type', type(model).__name__)}'s forward "
                f"pass to agree on the pipeline's dtypes: {type(e).__name__}: {e}"
            ) from e
    out = seen.get("sent", seen.get("gathered"))
    received = seen.get("received")
    return {
        "dtype": _name(out.dtype) if out is not None else None,
        "shape": list(out.shape) if out is not None else None,
        "recv_shape": list(received) if received is not None else None,
    }


@contextlib.contextmanager
def _recording_collectives(incoming: mx.Dtype | None) -> Iterator[dict[str, Any]]:
    """Replace the point-to-point and gather ops with recorders for one lazy trace."""
    global _tracing
    seen: dict[str, Any] = {}
    names = ("recv", "recv_like", "send", "all_gather")
    saved = {name: getattr(mx.distributed, name) for name in names}

    def template(x: mx.array) -> mx.array:
        seen["received"] = x.shape
        return mx.zeros(x.shape, dtype=incoming or x.dtype)

    def recv(shape, dtype, src, **kwargs):  # noqa: ARG001 - mirrors mx.distributed.recv
        return template(mx.zeros(shape, dtype=dtype))

    def recv_like(x, src, **kwargs):  # noqa: ARG001
        return template(x)

    def send(x, dst, **kwargs):  # noqa: ARG001
        seen["sent"] = x
        return x

    def all_gather(x, **kwargs):  # noqa: ARG001
        seen.setdefault("gathered", x)
        return x

    for name, fake in zip(names, (recv, recv_like, send, all_gather), strict=True):
        setattr(mx.distributed, name, fake)
    _tracing = True
    try:
        yield seen
    finally:
        _tracing = False
        for name, real in saved.items():
            setattr(mx.distributed, name, real)


def _name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def _dtype(name: str | None) -> mx.Dtype | None:
    return getattr(mx, name) if name else None
