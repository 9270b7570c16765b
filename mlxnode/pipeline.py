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
  depend on the send, since prompt prefill evaluates only the caches;
- layer n - 1 (rank 0's last, a placeholder elsewhere): all-gathers the hidden state, so every
  rank normalises and projects rank 0's output and samples the same token.
"""

from __future__ import annotations

import inspect
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

# Attributes every nn.Module sets for itself; not copied onto placeholders.
_MODULE_INTERNALS = ("_no_grad", "_training")


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
        gather: bool = False,
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
        self._gather = gather

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
        if self._recv_from is not None:
            x = mx.distributed.recv_like(x, self._recv_from, group=self._group)
        layer = self.get("layer")
        if layer is not None:
            h = layer(x, *args, **kwargs)
        else:
            h = x
            if cache is not None:
                dummy = mx.zeros((x.shape[0], 1, x.shape[1], 1), dtype=x.dtype)
                cache.update_and_fetch(dummy, dummy)
        if self._send_to is not None:
            h = mx.distributed.send(h, self._send_to, group=self._group)
            if cache is not None:
                cache.keys = mx.depends(cache.keys, h)
        if self._gather:
            h = mx.distributed.all_gather(h, group=self._group)[: h.shape[0]]
        return h


def generic_pipeline_problem(model: nn.Module) -> str | None:
    """Why the generic wrapper cannot split `model`, or None when it can."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None) if inner is not None else None
    if not isinstance(layers, list) or not layers:
        return "it has no `model.layers` list of decoder blocks"
    if getattr(model, "layers", layers) is not layers:
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


def apply_pipeline(model: nn.Module, group: mx.distributed.Group, start: int, end: int) -> None:
    """Keep layers [start, end) on this rank and wire it to its neighbours, in place.

    Call before the weights are evaluated: the layers this rank drops are never materialised.

    Raises:
        ValueError: the model does not fit the wrapper (see `generic_pipeline_problem`).
    """
    problem = generic_pipeline_problem(model)
    if problem is not None:
        raise ValueError(problem)
    layers = model.model.layers
    rank, size = group.rank(), group.size()
    last = len(layers) - 1
    for index, layer in enumerate(layers):
        local = start <= index < end
        recv_from = rank + 1 if index == start and rank < size - 1 else None
        send_to = rank - 1 if index == end - 1 and rank > 0 else None
        gather = index == last and size > 1
        if local and recv_from is None and send_to is None and not gather:
            continue  # an interior layer runs untouched
        layers[index] = _PipelineSlot(
            layer,
            local=local,
            cache_position=_cache_position(layer),
            group=group,
            recv_from=recv_from,
            send_to=send_to,
            gather=gather,
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
