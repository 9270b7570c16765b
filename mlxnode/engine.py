"""One rank's run: join the ranks, share and check the prompts, load, generate, report.

Every rank runs the same code. Rank 0 reads the prompts and shares them, every rank
checks them (so a bad prompt fails everywhere before any compute), loads only its own
weights (`mlxnode.loading`), and then all ranks generate in lockstep
(`mlxnode.generation`). A watchdog bounds every wait on a peer; only rank 0 writes the
answer, the output file and the metrics.

Python API::

    from mlxnode.config import load_config
    from mlxnode.engine import run
    from mlxnode.prompts import Prompt

    result = run(load_config().config, [Prompt(1, "Hello")])
    print(result.completions[0].completion, result.metrics.generation_tps)

or load once and generate many times, in one process, with no process exit::

    from mlxnode.generation import encode, generate
    from mlxnode.loading import load_sharded

    sharded = load_sharded(config)
    batch = encode(sharded.tokenizer, prompts, max_tokens=64)
    print(generate(sharded, batch).completions[0].completion)
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import mlx.core as mx

from . import distributed
from .config import Config, GenerationConfig
from .errors import InferenceError, MlxnodeError, UsageError
from .files import write_atomic
from .generation import Completion, Generation, encode, generate, make_sampler
from .loading import Guard, ShardedModel, load_sharded, unguarded
from .logs import CLI_REPORTS, env_rank
from .metrics import RankStats, RunMetrics, write_metrics
from .model_files import read_metadata
from .prompts import Prompt, prompts_from_json, prompts_to_json
from .replicas import generate_replicated
from .strategy import REPLICAS
from .watchdog import Watchdog

logger = logging.getLogger(__name__)

# Ranks wait this long for the slowest rank to join, share prompts or finish loading, which
# can take far longer than one generation step (distributed.step_timeout).
DEFAULT_LOAD_TIMEOUT = 600.0


@dataclass(frozen=True)
class RunResult:
    """What `run` produced: on every rank the completions and metrics; on rank 0 the files."""

    completions: list[Completion]
    metrics: RunMetrics
    output: Path | None = None
    metrics_json: Path | None = None


def run(
    config: Config,
    prompts: Sequence[Prompt] | Callable[[], Sequence[Prompt]],
    *,
    output: str | Path | None = None,
    metrics_json: str | Path | None = None,
    run_id: str | None = None,
    stdout: TextIO | None = None,
    load_timeout: float | None = DEFAULT_LOAD_TIMEOUT,
) -> RunResult:
    """Run `prompts` on the model of `config` over every rank `mlx.launch` started.

    Args:
        config: The resolved configuration (model, generation, distributed...).
        prompts: The prompts, or a function that reads them; only rank 0 calls it and
            shares the result, so stdin and prompt files need to exist there only.
        output: JSONL file for the results (rank 0 writes it atomically).
        metrics_json: JSON file for the run's metrics (rank 0).
        run_id: Name of the run, logged and recorded in the metrics.
        stdout: Where rank 0 writes the answer: the streamed text of a single prompt,
            or JSONL records of a batch when there is no `output`. None: nowhere.
        load_timeout: Seconds a rank waits for its peers to join and load; None: forever.

    Returns:
        The completions (on every rank) and the metrics gathered from every rank.

    Raises:
        MlxnodeError: see `model_files.read_metadata`, `generation.encode`,
            `loading.load_sharded`; every rank logs its own error with its rank before
            raising. A peer that stays silent past its timeout ends the process instead
            (`watchdog.hard_exit`).
    """
    started = time.perf_counter()
    rank, _ = env_rank()
    with Watchdog(
        rank=rank, timeout=config.distributed.step_timeout, exit_on_signals=True
    ) as watchdog:
        try:
            return _run(
                config,
                prompts,
                watchdog=watchdog,
                started=started,
                output=output,
                metrics_json=metrics_json,
                run_id=run_id,
                stdout=stdout,
                load_timeout=load_timeout,
            )
        except MlxnodeError as e:
            logger.error("%s", e, extra=CLI_REPORTS)
            raise
        except Exception as e:
            logger.error("internal error: %s: %s", type(e).__name__, e, extra=CLI_REPORTS)
            raise


def _run(
    config: Config,
    prompts: Sequence[Prompt] | Callable[[], Sequence[Prompt]],
    *,
    watchdog: Watchdog,
    started: float,
    output: str | Path | None,
    metrics_json: str | Path | None,
    run_id: str | None,
    stdout: TextIO | None,
    load_timeout: float | None,
) -> RunResult:
    group = join_guarded(config.distributed.backend, watchdog, load_timeout, run_id=run_id)
    wait, guard = phase_guards(watchdog, group, load_timeout)
    metadata = read_metadata(config)
    with (
        distributed.peer_errors(group.rank(), "receiving the prompts"),
        wait("waiting for the prompts from rank 0"),
    ):
        shared = share_prompts(group, prompts)
    gen = config.generation
    batch = encode(
        metadata.tokenizer,
        shared,
        max_tokens=gen.max_tokens,
        chat_template=gen.use_chat_template,
        context_length=metadata.context_length,
        model_name=metadata.name,
    )
    sharded = load_sharded(config, group, metadata, wait=wait, batch_size=len(batch))

    write = _printer(stdout if group.rank() == 0 else None)
    logger.info("generating %d prompt(s), up to %d new tokens", len(batch), gen.max_tokens)
    with guard("generating"):
        if sharded.plan.strategy == REPLICAS:
            generation = generate_replicated(
                sharded,
                batch,
                sampler=_seeded_sampler(gen),
                on_step=watchdog.beat,
                on_text=write,
                wait=wait,
            )
        else:
            generation = generate(
                sharded,
                batch,
                sampler=_seeded_sampler(gen),
                on_step=watchdog.beat,
                on_text=write if len(batch) == 1 else None,
            )
    if len(batch) == 1:
        write("\n")
    elif output is None:
        write(_jsonl(generation.completions))

    with (
        distributed.peer_errors(group.rank(), "gathering metrics"),
        guard("gathering metrics"),
    ):
        metrics = _gather_metrics(
            sharded,
            generation,
            backend=config.distributed.backend,
            started=started,
            run_id=run_id,
        )
    if group.rank() != 0:
        return RunResult(generation.completions, metrics)
    return _report(generation.completions, metrics, output=output, metrics_json=metrics_json)


def join_guarded(
    backend: str, watchdog: Watchdog, load_timeout: float | None, *, run_id: str | None = None
) -> mx.distributed.Group:
    """Join the group, bounded by `load_timeout` when a launcher started several ranks, and
    log which rank of how many this process is, on which host, in which run."""
    guarded = distributed.launched() and load_timeout is not None
    with (
        watchdog.guard("joining the group", timeout=load_timeout)
        if guarded
        else contextlib.nullcontext()
    ):
        group = distributed.join_group(backend)
    watchdog.rank = group.rank()
    logger.info(
        "rank %d of %d on %s%s",
        group.rank(),
        group.size(),
        socket.gethostname(),
        f", run {run_id}" if run_id else "",
    )
    return group


def phase_guards(
    watchdog: Watchdog, group: mx.distributed.Group, load_timeout: float | None
) -> tuple[Guard, Guard]:
    """(wait, step): bound a wait for the slowest peer by `load_timeout` (None: unbounded),
    and a phase by the step timeout between beats. One rank waits for nobody."""
    if group.size() == 1:
        return unguarded, unguarded
    if load_timeout is None:
        return unguarded, watchdog.guard
    return (lambda phase: watchdog.guard(phase, timeout=load_timeout)), watchdog.guard


def _seeded_sampler(gen: GenerationConfig) -> Callable[[mx.array], mx.array]:
    """The sampler of `gen`, with MLX's generator seeded so every rank draws the same."""
    mx.random.seed(gen.seed)
    return make_sampler(gen.temperature, gen.top_p)


def _printer(stream: TextIO | None) -> Callable[[str], None]:
    """A function that writes rank 0's answer to `stream` (None: nowhere) until it closes."""

    def write(text: str) -> None:
        nonlocal stream
        if stream is None:
            return
        try:
            stream.write(text)
            stream.flush()
        except BrokenPipeError:
            # The reader left (`| head`); keep generating in step with the other ranks,
            # which would otherwise wait on this one until their watchdog fires.
            logger.info("stdout was closed; finishing the run without printing")
            stream = None

    return write


def _gather_metrics(
    sharded: ShardedModel,
    generation: Generation,
    *,
    backend: str,
    started: float,
    run_id: str | None,
) -> RunMetrics:
    """The run's metrics, with every rank's figures all-gathered (a collective)."""
    group, plan = sharded.group, sharded.plan
    assert group is not None
    ranks = distributed.all_gather_json(
        group,
        {
            "rank": group.rank(),
            "host": socket.gethostname(),
            "layers": list(plan.layers) if plan.layers else None,
            "load_seconds": sharded.load_seconds,
            "peak_memory_bytes": int(mx.get_peak_memory()),
        },
        what="gathering metrics",
    )
    return RunMetrics(
        model=sharded.name,
        model_type=str(sharded.model_config.get("model_type", "?")),
        strategy=plan.strategy,
        implementation=plan.implementation,
        backend=backend,
        world_size=group.size(),
        split=plan.split,
        overlap=sharded.overlap,
        prompts=len(generation.completions),
        batched=generation.batched,
        prompt_tokens=generation.prompt_tokens,
        prompt_tps=generation.prompt_tps,
        generation_tokens=generation.generation_tokens,
        generation_tps=generation.generation_tps,
        ttft_seconds=generation.ttft_seconds,
        generate_seconds=generation.seconds,
        wall_seconds=time.perf_counter() - started,
        run_id=run_id,
        ranks=[RankStats(**r) for r in ranks],
    )


def _report(
    completions: list[Completion],
    metrics: RunMetrics,
    *,
    output: str | Path | None,
    metrics_json: str | Path | None,
) -> RunResult:
    """On rank 0: log the metrics, write the results and metrics files."""
    for line in metrics.summary().splitlines():
        logger.info("%s", line)
    written = None
    if output is not None:
        written = write_atomic(output, _jsonl(completions))
        logger.info("wrote %d result(s) to %s", len(completions), written)
    metrics_file = write_metrics(metrics_json, metrics) if metrics_json is not None else None
    return RunResult(completions, metrics, output=written, metrics_json=metrics_file)


def _jsonl(completions: Sequence[Completion]) -> str:
    return "".join(json.dumps(c.as_record(), ensure_ascii=False) + "\n" for c in completions)


def share_prompts(
    group: mx.distributed.Group, prompts: Sequence[Prompt] | Callable[[], Sequence[Prompt]]
) -> list[Prompt]:
    """Rank 0's prompts on every rank; a rank-0 error reading them is raised on every rank.

    Args:
        group: The ranks.
        prompts: The prompts, or a function that reads them (called on rank 0 only).

    Returns:
        Rank 0's prompts.

    Raises:
        MlxnodeError: rank 0 could not read them (its error, on every rank).
        DistributedSetupError: the ranks are not all sharing the prompts.
    """
    if group.size() == 1:
        return list(prompts() if callable(prompts) else prompts)
    payload: dict[str, Any] | None = None
    error: MlxnodeError | None = None
    if group.rank() == 0:
        try:
            payload = {"prompts": prompts_to_json(prompts() if callable(prompts) else prompts)}
        except MlxnodeError as e:
            error = e
            payload = {"error": type(e).__name__, "message": str(e)}
    shared = distributed.broadcast_json(group, payload, what="sharing the prompts")
    if error is not None:
        raise error
    if "error" in shared:
        kind = {"UsageError": UsageError, "InferenceError": InferenceError}.get(
            shared["error"], MlxnodeError
        )
        raise kind(f"{shared['message']} (reported by rank 0)")
    return prompts_from_json(shared["prompts"])
