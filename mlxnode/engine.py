"""Distributed inference: join the ranks, load this rank's shard, generate, report.

Every rank runs the same code. Rank 0 reads the prompts and shares them, every
rank checks them (so a bad prompt fails everywhere before any compute), loads only
its own weights, and then all ranks generate in lockstep: each computes the same
logits (pipeline: rank 0's hidden state is all-gathered; tensor: the partial sums
are all-reduced) and samples the same token from the same seed. Only rank 0 writes
the answer.

Python API::

    from mlxnode.config import load_config
    from mlxnode.engine import run
    from mlxnode.prompts import Prompt

    result = run(load_config().config, [Prompt(1, "Hello")])
    print(result.completions[0].completion, result.metrics.generation_tps)

or step by step: `Engine.prepare` (group, tokenizer: no weights), `Engine.encode`
(checks prompts), `Engine.load` (this rank's shard), `Engine.generate`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import mlx.core as mx
import mlx.nn as nn

from . import distributed
from .config import Config
from .errors import (
    DistributedSetupError,
    InferenceError,
    MlxnodeError,
    ModelLoadError,
    UsageError,
)
from .logs import env_rank
from .metrics import RankStats, RunMetrics, write_atomic, write_metrics
from .prompts import Prompt, prompts_from_json, prompts_to_json
from .sharding import checkpoint_layers, files_for_layers
from .strategy import PIPELINE, TENSOR, ShardPlan, apply_plan, num_layers, plan_shards
from .watchdog import Watchdog

logger = logging.getLogger(__name__)

# Ranks wait this long for the slowest rank to join, share prompts or finish loading, which
# can take far longer than one generation step (distributed.step_timeout).
DEFAULT_LOAD_TIMEOUT = 600.0

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
# A collective that fails because a peer went away raises RuntimeError("[ring] ...") etc.
_PEER_ERROR = re.compile(r"\[(ring|jaccl|mpi|nccl)\]")


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt, its token ids, and how many tokens it may generate."""

    prompt: Prompt
    ids: list[int]
    max_tokens: int


@dataclass
class Completion:
    """One prompt's result.

    `token_ids` are the completion's tokens without the end-of-sequence token, and
    `logprobs` their log-probabilities; `generation_tokens` counts every token the model
    produced, including that one.
    """

    id: str | int
    prompt: str
    completion: str
    token_ids: list[int]
    logprobs: list[float]
    prompt_tokens: int
    generation_tokens: int
    finish_reason: str
    ttft_seconds: float
    seconds: float

    def as_record(self) -> dict[str, Any]:
        """The JSONL record `--output` writes."""
        return {
            "id": self.id,
            "prompt": self.prompt,
            "completion": self.completion,
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "finish_reason": self.finish_reason,
            "token_ids": self.token_ids,
            "logprobs": self.logprobs,
            "timings": {"ttft_s": self.ttft_seconds, "total_s": self.seconds},
        }


@dataclass
class Generation:
    """What `Engine.generate` produced, with the counts for the metrics."""

    completions: list[Completion]
    batched: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    ttft_seconds: float
    seconds: float


@dataclass
class RunResult:
    completions: list[Completion]
    metrics: RunMetrics
    output: Path | None = None
    metrics_json: Path | None = None


@dataclass
class Engine:
    """One rank's view of a run: the group, the tokenizer and, once loaded, its shard."""

    config: Config
    group: mx.distributed.Group
    model_dir: Path
    model_name: str
    model_config: dict[str, Any]
    tokenizer: Any
    watchdog: Watchdog | None = None
    load_timeout: float | None = DEFAULT_LOAD_TIMEOUT
    model: nn.Module | None = None
    plan: ShardPlan | None = None
    load_seconds: float = 0.0
    _from_cache: bool = field(default=False, repr=False)

    # -- setup

    @classmethod
    def prepare(
        cls,
        config: Config,
        *,
        group: mx.distributed.Group | None = None,
        watchdog: Watchdog | None = None,
        load_timeout: float | None = DEFAULT_LOAD_TIMEOUT,
    ) -> Engine:
        """Join the group (unless given), find the model's files and load its tokenizer.

        No weights are read. With ``model.name`` the metadata comes through the cache.

        Raises:
            UsageError: no model given.
            ModelLoadError: the directory is not a model, or its tokenizer does not load.
            DistributedSetupError: the group cannot form.
        """
        if group is None:
            group = distributed.join_group(config.distributed.backend)
        model_dir, name, from_cache = _metadata_dir(config)
        model_config = _read_model_config(model_dir)
        tokenizer = _load_tokenizer(model_dir, model_config, config.generation.chat_template)
        return cls(
            config=config,
            group=group,
            model_dir=model_dir,
            model_name=name,
            model_config=model_config,
            tokenizer=tokenizer,
            watchdog=watchdog,
            load_timeout=load_timeout,
            _from_cache=from_cache,
        )

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def world_size(self) -> int:
        return self.group.size()

    @property
    def context_length(self) -> int | None:
        return context_length(self.model_config)

    # -- prompts

    def encode(self, prompts: Sequence[Prompt]) -> list[EncodedPrompt]:
        """Tokenise `prompts` (with the chat template when configured) and check they fit.

        Raises:
            UsageError: no prompts, or an empty one.
            InferenceError: a prompt does not fit the model's context.
        """
        if not prompts:
            raise UsageError("no prompts to run")
        generation = self.config.generation
        use_template = generation.use_chat_template and self.tokenizer.has_chat_template
        limit = self.context_length
        encoded = []
        for prompt in prompts:
            if not prompt.text.strip():
                raise UsageError(f"prompt {prompt.id!r} is empty; give some text")
            ids = encode_text(self.tokenizer, prompt.text, chat_template=use_template)
            max_tokens = generation.max_tokens
            if limit is not None:
                if len(ids) >= limit:
                    raise InferenceError(
                        f"prompt {prompt.id!r} is {len(ids)} tokens but {self.model_name} "
                        f"takes at most {limit} tokens of context, leaving no room to "
                        "generate; shorten the prompt"
                    )
                if len(ids) + max_tokens > limit:
                    max_tokens = limit - len(ids)
                    logger.warning(
                        "prompt %r: generating at most %d tokens (not %d) so prompt and "
                        "completion fit the model's context of %d",
                        prompt.id,
                        max_tokens,
                        generation.max_tokens,
                        limit,
                    )
            encoded.append(EncodedPrompt(prompt=prompt, ids=ids, max_tokens=max_tokens))
        return encoded

    # -- loading

    def load(self) -> ShardPlan:
        """Load this rank's shard: plan, prune or shard lazily, materialise, then a barrier.

        Raises:
            UsageError: a bad split or weights.
            ModelLoadError: the model cannot be loaded or split the way asked.
            DistributedSetupError: a peer went away while loading.
        """
        started = time.perf_counter()
        mx.reset_peak_memory()
        dist = self.config.distributed
        model = _instantiate(self.model_dir, self.model_name)
        plan = plan_shards(
            model,
            self.model_config,
            rank=self.rank,
            world_size=self.world_size,
            strategy=dist.strategy,
            backend=dist.backend,
            split=dist.split,
            weights=dist.weights,
        )
        if self.rank == 0:
            logger.info("strategy %s (%s): %s", plan.strategy, plan.implementation, plan.reason)
        weights_dir = self.model_dir
        if self._from_cache:
            weights_dir = self._fetch_weights(plan)
            model = _instantiate(weights_dir, self.model_name)
        _check_weight_files(weights_dir, plan, num_layers(model, self.model_config), self.rank)
        with _peer_errors(self.rank, "loading the model"):
            apply_plan(model, plan, self.group)
            mx.eval(model.parameters())
            local_seconds = time.perf_counter() - started
            layers = f"layers {plan.layers[0]}-{plan.layers[1] - 1}" if plan.layers else "all"
            logger.info(
                "loaded %s (%s) in %.2fs, peak memory %.1f MiB%s",
                layers,
                plan.strategy,
                local_seconds,
                mx.get_peak_memory() / 2**20,
                "; waiting for the other ranks" if self.world_size > 1 else "",
            )
            # Bounded also when the weights came through the cache: a link cut while a peer
            # loads must not hang until the launcher's --timeout (prewarm big models first).
            with self._guard_wait("waiting for every rank to finish loading", self.load_timeout):
                distributed.barrier(self.group)
        self.model, self.plan = model, plan
        self.load_seconds = local_seconds
        return plan

    def _fetch_weights(self, plan: ShardPlan) -> Path:
        manager = _cache_manager(self.config)
        local = manager.ensure_model(
            self.model_name,
            revision=self.config.model.revision,
            ranks=(self.rank,),
            world_size=self.world_size,
            strategy=TENSOR if plan.strategy != PIPELINE else PIPELINE,
            split=plan.split,
            force=self.config.cache.force_download,
        )
        logger.info(
            "model files ready in %s (%d fetched, %.1f MiB, %.1fs)",
            local.path,
            len(local.fetched_files),
            local.fetched_bytes / 2**20,
            local.seconds,
        )
        return Path(local.path)

    # -- generation

    def generate(
        self,
        batch: Sequence[EncodedPrompt],
        *,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Generate for every prompt: one prompt streams, several run as one batch.

        `on_text` gets each new piece of text of a single prompt (call it on rank 0 only
        to print). Every rank must call this with the same prompts.

        Raises:
            DistributedSetupError: a peer went away.
        """
        if self.model is None:
            raise RuntimeError("Engine.load() must run before generate()")
        gen = self.config.generation
        mx.random.seed(gen.seed)
        sampler = _make_sampler(gen.temperature, gen.top_p)
        from mlx_lm.generate import generation_stream

        logger.info("generating %d prompt(s), up to %d new tokens", len(batch), gen.max_tokens)
        with _peer_errors(self.rank, "generating"), self._guard_step("generating"):
            if len(batch) == 1:
                result = self._stream(batch[0], sampler=sampler, on_text=on_text)
            else:
                result = self._batch(batch, sampler=sampler)
            # mlx-lm starts computing the next token before it knows it is done; that step
            # holds collectives, and any collective we run next must not overtake it.
            mx.synchronize(generation_stream)
        return result

    def _stream(
        self, item: EncodedPrompt, *, sampler: Callable, on_text: Callable[[str], None] | None
    ) -> Generation:
        from mlx_lm.generate import stream_generate

        started = time.perf_counter()
        ttft = 0.0
        pieces: list[str] = []
        tokens: list[int] = []
        logprobs: list[float] = []
        last = None
        for response in stream_generate(
            self.model,
            self.tokenizer,
            mx.array(item.ids),
            max_tokens=item.max_tokens,
            sampler=sampler,
            prompt_progress_callback=lambda *_: self._beat(),
        ):
            self._beat()
            if last is None:
                ttft = time.perf_counter() - started
            last = response
            if response.finish_reason != "stop":
                tokens.append(response.token)
                logprobs.append(response.logprobs[response.token].item())
            pieces.append(response.text)
            if on_text is not None and response.text:
                on_text(response.text)
        seconds = time.perf_counter() - started
        assert last is not None  # stream_generate always yields a final response
        completion = Completion(
            id=item.prompt.id,
            prompt=item.prompt.text,
            completion="".join(pieces),
            token_ids=tokens,
            logprobs=logprobs,
            prompt_tokens=len(item.ids),
            generation_tokens=last.generation_tokens,
            finish_reason=last.finish_reason or "length",
            ttft_seconds=ttft,
            seconds=seconds,
        )
        return Generation(
            completions=[completion],
            batched=False,
            prompt_tokens=len(item.ids),
            prompt_tps=last.prompt_tps,
            generation_tokens=last.generation_tokens,
            generation_tps=last.generation_tps,
            ttft_seconds=ttft,
            seconds=seconds,
        )

    def _batch(self, batch: Sequence[EncodedPrompt], *, sampler: Callable) -> Generation:
        from mlx_lm.generate import BatchGenerator

        started = time.perf_counter()
        generator = BatchGenerator(
            self.model,
            max_tokens=max(item.max_tokens for item in batch),
            stop_tokens=[[t] for t in sorted(self.tokenizer.eos_token_ids)],
            sampler=sampler,
        )
        try:
            uids = generator.insert(
                [item.ids for item in batch], max_tokens=[item.max_tokens for item in batch]
            )
            by_uid = dict(zip(uids, batch, strict=True))
            tokens: dict[int, list[int]] = {uid: [] for uid in uids}
            logprobs: dict[int, list[float]] = {uid: [] for uid in uids}
            counts = dict.fromkeys(uids, 0)
            first: dict[int, float] = {}
            done: dict[int, tuple[str, float]] = {}
            with generator.stats() as stats:
                while True:
                    prompt_responses, responses = generator.next()
                    self._beat()
                    if not prompt_responses and not responses:
                        break
                    now = time.perf_counter() - started
                    for r in responses:
                        counts[r.uid] += 1
                        first.setdefault(r.uid, now)
                        if r.finish_reason != "stop":
                            tokens[r.uid].append(r.token)
                            logprobs[r.uid].append(r.logprobs[r.token].item())
                        if r.finish_reason is not None:
                            done[r.uid] = (r.finish_reason, now)
        finally:
            generator.close()
        seconds = time.perf_counter() - started
        completions = [
            Completion(
                id=by_uid[uid].prompt.id,
                prompt=by_uid[uid].prompt.text,
                completion=self.tokenizer.decode(tokens[uid]),
                token_ids=tokens[uid],
                logprobs=logprobs[uid],
                prompt_tokens=len(by_uid[uid].ids),
                generation_tokens=counts[uid],
                finish_reason=done.get(uid, ("length", seconds))[0],
                ttft_seconds=first.get(uid, seconds),
                seconds=done.get(uid, ("length", seconds))[1],
            )
            for uid in uids
        ]
        return Generation(
            completions=completions,
            batched=True,
            prompt_tokens=sum(len(item.ids) for item in batch),
            prompt_tps=stats.prompt_tps,
            generation_tokens=stats.generation_tokens,
            generation_tps=stats.generation_tps,
            ttft_seconds=min(first.values(), default=seconds),
            seconds=seconds,
        )

    # -- watchdog

    def _guard_step(self, phase: str) -> contextlib.AbstractContextManager:
        """Bound `phase` by the step timeout (distributed.step_timeout) between beats."""
        if self.watchdog is None or self.world_size == 1:
            return contextlib.nullcontext()
        return self.watchdog.guard(phase)

    def _guard_wait(self, phase: str, timeout: float | None) -> contextlib.AbstractContextManager:
        """Bound a wait for the slowest peer by `timeout` (None: unbounded)."""
        if self.watchdog is None or self.world_size == 1 or timeout is None:
            return contextlib.nullcontext()
        return self.watchdog.guard(phase, timeout=timeout)

    def _beat(self) -> None:
        if self.watchdog is not None:
            self.watchdog.beat()


# -- the whole run


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
        MlxnodeError: see `Engine.prepare`, `Engine.encode`, `Engine.load`; every rank
            logs its own error with its rank before raising.
    """
    started = time.perf_counter()
    rank, _ = env_rank()
    dist = config.distributed
    with Watchdog(rank=rank, timeout=dist.step_timeout) as watchdog:
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
            logger.error("%s", e)
            raise
        except Exception as e:
            logger.error("internal error: %s: %s", type(e).__name__, e)
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
    dist = config.distributed
    guard_join = distributed.launched() and load_timeout is not None
    with watchdog.guard("joining the group", timeout=load_timeout) if guard_join else _null():
        group = distributed.join_group(dist.backend)
    watchdog.rank = group.rank()
    host = socket.gethostname()
    logger.info(
        "rank %d of %d on %s%s",
        group.rank(),
        group.size(),
        host,
        f", run {run_id}" if run_id else "",
    )
    engine = Engine.prepare(config, group=group, watchdog=watchdog, load_timeout=load_timeout)
    with (
        _peer_errors(group.rank(), "receiving the prompts"),
        engine._guard_wait("waiting for the prompts from rank 0", load_timeout),
    ):
        shared = share_prompts(group, prompts)
    batch = engine.encode(shared)
    plan = engine.load()

    primary = group.rank() == 0
    out = stdout if primary else None
    single = len(batch) == 1

    def on_text(text: str) -> None:
        nonlocal out
        if out is None:
            return
        try:
            out.write(text)
            out.flush()
        except BrokenPipeError:
            # The reader left (`| head`); keep generating in step with the other ranks,
            # which would otherwise wait on this one until their watchdog fires.
            logger.info("stdout was closed; finishing the run without printing")
            out = None

    generation = engine.generate(batch, on_text=on_text if single else None)
    if single:
        on_text("\n")
    elif output is None:
        on_text(
            "".join(
                json.dumps(c.as_record(), ensure_ascii=False) + "\n" for c in generation.completions
            )
        )

    with _peer_errors(group.rank(), "gathering metrics"), engine._guard_step("gathering metrics"):
        ranks = distributed.all_gather_json(
            group,
            {
                "rank": group.rank(),
                "host": host,
                "layers": list(plan.layers) if plan.layers else None,
                "load_seconds": engine.load_seconds,
                "peak_memory_bytes": int(mx.get_peak_memory()),
            },
            what="gathering metrics",
        )
    metrics = RunMetrics(
        model=engine.model_name,
        model_type=str(engine.model_config.get("model_type", "?")),
        strategy=plan.strategy,
        implementation=plan.implementation,
        backend=dist.backend,
        world_size=group.size(),
        split=plan.split,
        prompts=len(batch),
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
    result = RunResult(completions=generation.completions, metrics=metrics)
    if primary:
        for line in metrics.summary().splitlines():
            logger.info("%s", line)
        if output is not None:
            records = "".join(
                json.dumps(c.as_record(), ensure_ascii=False) + "\n" for c in result.completions
            )
            result.output = write_atomic(output, records)
            logger.info("wrote %d result(s) to %s", len(result.completions), result.output)
        if metrics_json is not None:
            result.metrics_json = write_metrics(metrics_json, metrics)
    return result


def share_prompts(
    group: mx.distributed.Group, prompts: Sequence[Prompt] | Callable[[], Sequence[Prompt]]
) -> list[Prompt]:
    """Rank 0's prompts on every rank; a rank-0 error reading them is raised on every rank."""
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


# -- model files


def _metadata_dir(config: Config) -> tuple[Path, str, bool]:
    """(directory with config.json and tokenizer, the model's name, whether it is cached)."""
    if config.model.path:
        path = Path(config.model.path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is not a model directory (no config.json); check --model-path"
            )
        return path, str(path), False
    if config.model.name:
        manager = _cache_manager(config)
        path = manager.fetch_metadata(config.model.name, revision=config.model.revision)
        return Path(path), config.model.name, True
    raise UsageError("no model: pass --model ORG/NAME or --model-path DIR, or set model.name")


def _cache_manager(config: Config) -> Any:
    """The model cache for ``model.name``: the one place the engine touches it."""
    from .cache import ModelCacheManager

    return ModelCacheManager.from_config(config)


def _read_model_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object; is this a model directory?")
    return data


def _load_tokenizer(model_dir: Path, model_config: dict[str, Any], chat_template: str | None):
    from mlx_lm.utils import load_tokenizer

    extra = {}
    if chat_template:
        extra["chat_template"] = _read_template(chat_template)
    try:
        return load_tokenizer(
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


def _instantiate(model_dir: Path, name: str) -> nn.Module:
    """The model with lazily loaded weights (none read yet; missing files allowed)."""
    from mlx_lm.utils import load_model

    # mlx-lm reads every present file's header here; a truncated one must be named.
    for path in sorted(model_dir.glob("model*.safetensors")):
        _check_safetensors(path)
    try:
        model, _ = load_model(model_dir, lazy=True, strict=False)
    except ValueError as e:
        raise ModelLoadError(f"mlx-lm cannot load {name}: {e}") from e
    except (OSError, KeyError, TypeError) as e:
        raise ModelLoadError(f"cannot load {name} from {model_dir}: {e}") from e
    return model


def _check_weight_files(model_dir: Path, plan: ShardPlan, layer_count: int, rank: int) -> None:
    """Fail clearly when a weight file this rank needs is absent (strict=False would not)."""
    index = model_dir / _INDEX_FILE
    if not index.is_file():
        if not any(model_dir.glob("model*.safetensors")):
            raise ModelLoadError(f"{model_dir} has no weights (model*.safetensors)")
        return
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot read {index}: {e}") from e
    absent = sorted(set(range(layer_count)) - checkpoint_layers(weight_map))
    if absent:
        raise ModelLoadError(
            f"{model_dir}'s checkpoint has no weights for layers {absent}; convert the model "
            "with mlx_lm.convert first"
        )
    start, end = plan.layers if plan.layers else (0, layer_count)
    needed = files_for_layers(weight_map, start, end)
    missing = sorted(f for f in needed if not (model_dir / f).is_file())
    if missing:
        raise ModelLoadError(
            f"rank {rank} needs {', '.join(missing)} (layers {start}-{end - 1}) but "
            f"{model_dir} lacks them; fetch the model again"
        )


def _check_safetensors(path: Path) -> None:
    """Fail with the file's name when a weight file is truncated or not safetensors.

    MLX would otherwise fail inside the lazy load with a RuntimeError naming no file.
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


# -- helpers


def context_length(model_config: dict[str, Any]) -> int | None:
    """The longest sequence the model takes, from its config, if it says."""
    for source in (model_config, model_config.get("text_config", {})):
        for key in _CONTEXT_KEYS:
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def encode_text(tokenizer: Any, text: str, *, chat_template: bool) -> list[int]:
    """Token ids for `text`, as mlx-lm's generate does (template, then no extra BOS)."""
    if chat_template:
        from jinja2 import TemplateError

        try:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        except TemplateError as e:
            raise UsageError(
                f"the chat template cannot be applied ({type(e).__name__}: {e}); fix "
                "--chat-template (or the model's template) or pass --no-chat-template"
            ) from e
        return list(tokenizer.encode(rendered, add_special_tokens=False))
    bos = tokenizer.bos_token
    return list(tokenizer.encode(text, add_special_tokens=bos is None or not text.startswith(bos)))


def _make_sampler(temperature: float, top_p: float) -> Callable:
    from mlx_lm.sample_utils import make_sampler

    return make_sampler(temp=temperature, top_p=top_p if top_p < 1.0 else 0.0)


@contextlib.contextmanager
def _peer_errors(rank: int, phase: str) -> Iterator[None]:
    """Turn a collective's "[ring] connection to a peer was lost" into a DistributedSetupError."""
    try:
        yield
    except RuntimeError as e:
        if not _PEER_ERROR.search(str(e)):
            raise
        host = socket.gethostname()
        raise DistributedSetupError(
            f"rank {rank} on {host} lost a peer while {phase}: {e}; see the other ranks' logs",
            rank=rank,
            host=host,
        ) from e


@contextlib.contextmanager
def _null() -> Iterator[None]:
    yield
