"""Replicas: every rank holds the whole model and runs its own share of the batch.

No collective runs while generating. The prompts are dealt out by cost (prompt tokens plus
the tokens each may generate), longest first, each to the rank with the least work so far
(the LPT rule), so the ranks finish close together; the completions are then all-gathered
and put back in input order, with the ids the prompts came with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx

from . import distributed
from .generation import Completion, EncodedPrompt, Generation, generate
from .loading import Guard, ShardedModel, unguarded

logger = logging.getLogger(__name__)


def assign(batch: Sequence[EncodedPrompt], world_size: int) -> list[list[int]]:
    """Indices of `batch` each rank runs, in input order; the most costly prompt goes to rank 0.

    Ties go to the lower rank, so a single prompt runs on rank 0 (which prints it).
    """
    shares: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    by_cost = sorted(range(len(batch)), key=lambda i: (-_cost(batch[i]), i))
    for i in by_cost:
        rank = min(range(world_size), key=lambda r: (load[r], r))
        shares[rank].append(i)
        load[rank] += _cost(batch[i])
    return [sorted(share) for share in shares]


def _cost(item: EncodedPrompt) -> int:
    return len(item.ids) + item.max_tokens


def generate_replicated(
    sharded: ShardedModel,
    batch: Sequence[EncodedPrompt],
    *,
    sampler: Callable[[mx.array], mx.array] | None = None,
    on_step: Callable[[], None] | None = None,
    on_text: Callable[[str], None] | None = None,
    wait: Guard = unguarded,
) -> Generation:
    """Run this rank's share of `batch` on its own copy, then gather every completion.

    Every rank must call this with the same batch. With one prompt, rank 0 runs it and
    streams its text to `on_text`.

    Args:
        sharded: A rank holding the whole model (plan `replicas`).
        batch: The encoded prompts, as every rank has them.
        sampler: Picks each token; None: greedy.
        on_step: Called after every step of this rank's model (a watchdog's beat).
        on_text: Gets the text of a single prompt as it comes (rank 0 only).
        wait: Wraps the wait for the slowest replica.

    Returns:
        Every completion, in the order of `batch`, on every rank; token counts summed over
        the replicas, rates over the slowest replica's time.

    Raises:
        DistributedSetupError: a peer went away, or the ranks fell out of step.
    """
    group = sharded.group
    rank, world_size = sharded.rank, sharded.world_size
    mine = assign(batch, world_size)[rank]
    logger.info("replica %d runs %d of %d prompt(s)", rank, len(mine), len(batch))
    local = None
    if mine:
        local = generate(
            sharded,
            [batch[i] for i in mine],
            sampler=sampler,
            on_step=on_step,
            on_text=on_text if len(batch) == 1 else None,
        )
    if group is None or world_size == 1:
        assert local is not None
        return local
    record = {"indices": mine, "generation": _to_json(local)}
    with (
        distributed.peer_errors(rank, "gathering the replicas' completions"),
        wait("waiting for the other replicas to finish generating"),
    ):
        gathered = distributed.all_gather_json(
            group, record, what="gathering the replicas' completions"
        )
    return _merge(gathered, len(batch))


def _to_json(generation: Generation | None) -> dict[str, Any] | None:
    if generation is None:
        return None
    return {
        "completions": [vars(c) for c in generation.completions],
        "batched": generation.batched,
        "prompt_tokens": generation.prompt_tokens,
        "prompt_tps": generation.prompt_tps,
        "generation_tokens": generation.generation_tokens,
        "generation_tps": generation.generation_tps,
        "ttft_seconds": generation.ttft_seconds,
        "seconds": generation.seconds,
    }


def _merge(records: Sequence[dict[str, Any]], size: int) -> Generation:
    """One `Generation` of the whole batch from every replica's record, in input order."""
    completions: list[Completion | None] = [None] * size
    ran = [r["generation"] for r in records if r["generation"] is not None]
    for record in records:
        generation = record["generation"]
        for index, fields in zip(
            record["indices"], generation["completions"] if generation else [], strict=True
        ):
            completions[index] = Completion(**fields)
    assert all(c is not None for c in completions)
    seconds = max(g["seconds"] for g in ran)
    prefill_seconds = max(
        (g["prompt_tokens"] / g["prompt_tps"] for g in ran if g["prompt_tps"]), default=0.0
    )
    prompt_tokens = sum(g["prompt_tokens"] for g in ran)
    generation_tokens = sum(g["generation_tokens"] for g in ran)
    decode_seconds = max(
        (g["generation_tokens"] / g["generation_tps"] for g in ran if g["generation_tps"]),
        default=0.0,
    )
    return Generation(
        completions=[c for c in completions if c is not None],
        batched=any(g["batched"] for g in ran),
        prompt_tokens=prompt_tokens,
        prompt_tps=prompt_tokens / prefill_seconds if prefill_seconds else 0.0,
        generation_tokens=generation_tokens,
        generation_tps=generation_tokens / decode_seconds if decode_seconds else 0.0,
        ttft_seconds=min(g["ttft_seconds"] for g in ran),
        seconds=seconds,
    )
