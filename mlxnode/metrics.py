"""What a run cost: throughput and latency on rank 0, load time and memory on every rank."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import write_atomic
from .formatting import format_bytes


@dataclass
class RankStats:
    """One rank's share of the work, gathered to rank 0 at the end of a run."""

    rank: int
    host: str
    layers: list[int] | None  # [start, end) for a pipeline rank, else None
    load_seconds: float
    peak_memory_bytes: int


@dataclass
class RunMetrics:
    """The numbers `mlxnode run` reports at the end (and writes with --metrics-json)."""

    model: str
    model_type: str
    strategy: str  # local, pipeline or tensor
    implementation: str  # how: "mlx-lm pipeline", "mlxnode generic pipeline", "mlx-lm shard"...
    backend: str
    world_size: int
    split: list[int] | None
    overlap: bool  # the pipeline's stages worked at once (chunked prompts, micro-batches)
    prompts: int
    batched: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    ttft_seconds: float
    generate_seconds: float
    wall_seconds: float
    run_id: str | None = None
    ranks: list[RankStats] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """A few lines for the log."""
        lines = [
            f"{self.prompts} prompt(s), {self.strategy} over {self.world_size} rank(s) "
            f"({self.implementation}, backend {self.backend})",
            f"prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tok/s; "
            f"generation: {self.generation_tokens} tokens, {self.generation_tps:.1f} tok/s",
            f"time to first token {self.ttft_seconds:.3f}s, "
            f"generation {self.generate_seconds:.3f}s, wall {self.wall_seconds:.3f}s",
        ]
        for r in self.ranks:
            layers = f" layers {r.layers[0]}-{r.layers[1] - 1}" if r.layers else ""
            lines.append(
                f"rank {r.rank} on {r.host}:{layers} load {r.load_seconds:.2f}s, "
                f"peak memory {format_bytes(r.peak_memory_bytes)}"
            )
        return "\n".join(lines)


def write_metrics(path: str | os.PathLike[str], metrics: RunMetrics) -> Path:
    return write_atomic(path, json.dumps(metrics.as_dict(), indent=2) + "\n")
