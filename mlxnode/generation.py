"""Generate with a loaded shard: encode prompts, run them, assemble their completions.

Every rank of a sharded model calls these with the same prompts, seed and sampler, and every
rank gets the same tokens: in a pipeline only rank 0 computes logits and samples, and its
token ids reach the other ranks in one all-sum per step (`pipeline.TokenSharing`, wrapped
around every sampler here); under tensor parallelism the partial sums are all-reduced, so
every rank computes the same logits and samples the same token.

`generate` is the one-shot path: one prompt streams through mlx-lm's `stream_generate`
(as ``mlx_lm.generate`` does), several run as one batch. The batch goes through a thin step
API over mlx-lm's continuous batcher, which a long-running server drives itself:
`batch_generator` once, `insert` requests as they come, `step` until it returns None, and
`complete` each request from its `Token`s.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator

from .distributed import hop_stream, peer_errors, settle
from .errors import InferenceError, UsageError
from .loading import ShardedModel
from .pipeline import TokenSharing
from .prompts import Prompt
from .strategy import GENERIC_PIPELINE, PIPELINE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt, its token ids, and how many tokens it may generate."""

    prompt: Prompt
    ids: list[int]
    max_tokens: int


@dataclass(frozen=True)
class Token:
    """One token a request produced, as it came.

    `finish_reason` is "stop" for the end-of-sequence token (not part of the completion),
    "length" for the last token `max_tokens` allows, else None. `time` is the
    `time.perf_counter()` when it arrived.
    """

    uid: int
    id: int
    # Kept as an array being evaluated in the background: reading it at once (`.item()`)
    # would wait for the next step mlx-lm has already queued, which cost a third of the
    # tokens/s on a GPU. `logprob` reads it when the completion is assembled.
    logprob_array: mx.array
    finish_reason: str | None
    time: float

    @property
    def logprob(self) -> float:
        return self.logprob_array.item()


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class Generation:
    """What `generate` produced, with the counts for the metrics."""

    completions: list[Completion]
    batched: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    ttft_seconds: float
    seconds: float


# -- prompts


def encode(
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    max_tokens: int,
    chat_template: bool = True,
    context_length: int | None = None,
    model_name: str = "the model",
) -> list[EncodedPrompt]:
    """Tokenise `prompts` and check they fit the model's context.

    Args:
        tokenizer: mlx-lm's tokenizer of the model.
        prompts: The prompts, in order.
        max_tokens: Tokens each may generate; capped (with a warning) where prompt and
            completion would not fit `context_length`.
        chat_template: Apply the tokenizer's chat template, if it has one.
        context_length: The model's context, if known.
        model_name: Named in errors.

    Returns:
        The encoded prompts, in order.

    Raises:
        UsageError: no prompts, an empty one, or a chat template that fails.
        InferenceError: a prompt does not fit the model's context.
    """
    if not prompts:
        raise UsageError("no prompts to run")
    use_template = chat_template and tokenizer.has_chat_template
    encoded = []
    for prompt in prompts:
        if not prompt.text.strip():
            raise UsageError(f"prompt {prompt.id!r} is empty; give some text")
        ids = encode_text(tokenizer, prompt.text, chat_template=use_template)
        allowed = max_tokens
        if context_length is not None:
            if len(ids) >= context_length:
                raise InferenceError(
                    f"prompt {prompt.id!r} is {len(ids)} tokens but {model_name} takes at most "
                    f"{context_length} tokens of context, leaving no room to generate; "
                    "shorten the prompt"
                )
            if len(ids) + max_tokens > context_length:
                allowed = context_length - len(ids)
                logger.warning(
                    "prompt %r: generating at most %d tokens (not %d) so prompt and "
                    "completion fit the model's context of %d",
                    prompt.id,
                    allowed,
                    max_tokens,
                    context_length,
                )
        encoded.append(EncodedPrompt(prompt=prompt, ids=ids, max_tokens=allowed))
    return encoded


def encode_text(tokenizer: Any, text: str, *, chat_template: bool) -> list[int]:
    """Token ids for `text`, as mlx-lm's generate does (template, then no extra BOS).

    Raises:
        UsageError: the chat template cannot be applied.
    """
    if chat_template:
        return encode_messages(tokenizer, [{"role": "user", "content": text}])
    bos = tokenizer.bos_token
    return list(tokenizer.encode(text, add_special_tokens=bos is None or not text.startswith(bos)))


def encode_messages(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> list[int]:
    """Token ids for a chat (`[{"role": ..., "content": ...}]`) through the chat template.

    Raises:
        UsageError: the chat template cannot be applied.
    """
    from jinja2 import TemplateError

    try:
        rendered = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
    except TemplateError as e:
        raise UsageError(
            f"the chat template cannot be applied ({type(e).__name__}: {e}); fix "
            "--chat-template (or the model's template) or pass --no-chat-template"
        ) from e
    return list(tokenizer.encode(rendered, add_special_tokens=False))


def make_sampler(temperature: float, top_p: float) -> Callable[[mx.array], mx.array]:
    """mlx-lm's sampler for `temperature` (0: greedy) and `top_p` (1: off)."""
    from mlx_lm.sample_utils import make_sampler as mlx_lm_make_sampler

    return mlx_lm_make_sampler(temp=temperature, top_p=top_p if top_p < 1.0 else 0.0)


def seeded_sampler(
    temperature: float, top_p: float, seed: int
) -> Callable[[mx.array], mx.array] | None:
    """A sampler with a random stream of its own, seeded by `seed`; None when greedy.

    Unlike `make_sampler` it does not draw from MLX's global generator, so one request's
    tokens depend only on its seed, not on what else shares the batch; every rank that
    builds it from the same arguments draws the same tokens. None lets a batch generator
    use its greedy fallback, shared by every greedy request in one batched argmax.
    """
    if temperature == 0:
        return None
    from mlx_lm.sample_utils import apply_top_p

    key = mx.random.key(seed)

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, draw = mx.random.split(key)
        if top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        return mx.random.categorical(logprobs * (1.0 / temperature), key=draw)

    return sample


# -- one-shot generation


def generate(
    sharded: ShardedModel,
    batch: Sequence[EncodedPrompt],
    *,
    sampler: Callable[[mx.array], mx.array] | None = None,
    on_step: Callable[[], None] | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """Generate for every prompt: one prompt streams, several run as one batch.

    Every rank must call this with the same prompts and an equally seeded sampler.

    Args:
        sharded: This rank's shard (`loading.load_sharded`).
        batch: The encoded prompts (`encode`).
        sampler: Picks each token from the log-probabilities; None: greedy.
        on_step: Called after every step of the model (a watchdog's beat).
        on_text: Gets each new piece of text of a single prompt (to print it).

    Returns:
        The completions in the order of `batch`, and the counts for the metrics.

    Raises:
        DistributedSetupError: a peer went away.
    """
    from mlx_lm.generate import generation_stream

    on_step = on_step or _nothing
    with peer_errors(sharded.rank, "generating"):
        if len(batch) == 1:
            sharing = _token_sharing(sharded)
            if sharing is not None:
                sampler = sharing.share(sampler)
            result = _generate_one(sharded, batch[0], sampler, on_step, on_text or _nothing)
        else:
            result = _generate_batch(sharded, batch, sampler, on_step)
        # mlx-lm starts computing the next token before it knows it is done; that step
        # holds collectives, and any collective we run next must not overtake it.
        settle(generation_stream)
    return result


def _generate_one(
    sharded: ShardedModel,
    item: EncodedPrompt,
    sampler: Callable | None,
    on_step: Callable[[], None],
    on_text: Callable[[str], None],
) -> Generation:
    from mlx_lm.generate import stream_generate

    started = time.perf_counter()
    tokens: list[Token] = []
    pieces: list[str] = []
    last = None
    for response in stream_generate(
        sharded.model,
        sharded.tokenizer,
        mx.array(item.ids),
        max_tokens=item.max_tokens,
        sampler=sampler,
        prompt_progress_callback=lambda *_: on_step(),
        prefill_step_size=prefill_step(sharded),
    ):
        on_step()
        tokens.append(_token(0, response))
        last = response
        pieces.append(response.text)
        if response.text:
            on_text(response.text)
    ended = time.perf_counter()
    assert last is not None  # stream_generate always yields a final response
    done = complete(item, tokens, "".join(pieces), started=started, ended=ended)
    return Generation(
        completions=[done],
        batched=False,
        prompt_tokens=len(item.ids),
        prompt_tps=last.prompt_tps,
        generation_tokens=last.generation_tokens,
        generation_tps=last.generation_tps,
        ttft_seconds=done.ttft_seconds,
        seconds=ended - started,
    )


def _generate_batch(
    sharded: ShardedModel,
    batch: Sequence[EncodedPrompt],
    sampler: Callable | None,
    on_step: Callable[[], None],
) -> Generation:
    """`batch` through one batch generator per micro-batch (`micro_batches`), in turns.

    With one generator per pipeline stage, each turn queues one micro-batch's next step
    and waits only for that micro-batch's previous one: while the last stage finishes
    micro-batch A (and rank 0 samples it), the first stage computes micro-batch B, whose
    hops wait on the hop stream instead of the layers (`distributed.hop_stream`). Every
    rank takes the same turns with the same tokens, so their hops pair up.
    """
    started = time.perf_counter()
    parts = micro_batches(sharded, batch)
    if len(parts) > 1 and sharded.rank == 0:
        logger.info("batch of %d in %d micro-batches, one per stage", len(batch), len(parts))
    max_tokens = max(item.max_tokens for item in batch)
    generators = [batch_generator(sharded, sampler=sampler, max_tokens=max_tokens) for _ in parts]
    tokens: dict[int, list[Token]] = {i: [] for i in range(len(batch))}  # by index in `batch`
    try:
        uids = [
            insert(g, [batch[i] for i in part]) for g, part in zip(generators, parts, strict=True)
        ]
        index = [dict(zip(u, part, strict=True)) for u, part in zip(uids, parts, strict=True)]
        with contextlib.ExitStack() as windows:
            stats = [windows.enter_context(g.stats()) for g in generators]
            turns = list(range(len(generators)))
            while turns:
                for k in list(turns):
                    produced = step(generators[k])
                    if produced is None:
                        turns.remove(k)
                        continue
                    on_step()
                    for token in produced:
                        tokens[index[k][token.uid]].append(token)
    finally:
        for generator in generators:
            generator.close()
    ended = time.perf_counter()
    completions = []
    for i, item in enumerate(batch):
        text = sharded.tokenizer.decode([t.id for t in tokens[i] if t.finish_reason != "stop"])
        completions.append(complete(item, tokens[i], text, started=started, ended=ended))
    prompt_time = sum(s.prompt_time for s in stats)
    generation_tokens = sum(s.generation_tokens for s in stats)
    generation_time = (ended - started) - prompt_time
    return Generation(
        completions=completions,
        batched=True,
        prompt_tokens=sum(len(item.ids) for item in batch),
        prompt_tps=sum(s.prompt_tokens for s in stats) / prompt_time if prompt_time > 0 else 0.0,
        generation_tokens=generation_tokens,
        generation_tps=generation_tokens / generation_time if generation_time > 0 else 0.0,
        ttft_seconds=min(c.ttft_seconds for c in completions),
        seconds=ended - started,
    )


# mlx-lm reads a prompt in chunks of 2048 tokens, and a pipeline passes each chunk on only
# once its stage has read all of it: a 2,000-token prompt keeps one stage busy at a time.
# In chunks of OVERLAP_PREFILL_STEP, the first stage reads chunk k + 1 while the next one
# reads chunk k. Smaller chunks fill the pipeline sooner but multiply fewer rows at a time.
MLX_LM_PREFILL_STEP = 2048
OVERLAP_PREFILL_STEP = 128


def prefill_step(sharded: ShardedModel) -> int:
    """How many prompt tokens one forward pass reads."""
    return OVERLAP_PREFILL_STEP if sharded.overlap else MLX_LM_PREFILL_STEP


def micro_batches(sharded: ShardedModel, batch: Sequence[EncodedPrompt]) -> list[list[int]]:
    """Indices of `batch` in each micro-batch: one per pipeline stage where stages overlap.

    The longest prompts are dealt out first, so the micro-batches take about as long.
    """
    ways = min(sharded.world_size, len(batch)) if sharded.overlap else 1
    by_length = sorted(range(len(batch)), key=lambda i: -len(batch[i].ids))
    return [sorted(by_length[k::ways]) for k in range(ways)]


# -- step by step, over mlx-lm's continuous batching


def batch_generator(
    sharded: ShardedModel,
    *,
    sampler: Callable[[mx.array], mx.array] | None = None,
    max_tokens: int,
    max_batch: int | None = None,
) -> Any:
    """mlx-lm's `BatchGenerator` for `sharded`, stopping at the tokenizer's end tokens.

    Call its ``close()`` when done. Every rank must drive its own the same way. In a
    pipeline its samplers (its own and each request's) sample on rank 0 only.

    Args:
        sharded: This rank's shard.
        sampler: Picks each token; None: greedy.
        max_tokens: The most tokens a request inserted without its own limit generates.
        max_batch: The most requests generating at once (None: mlx-lm's default); the
            others wait for a place.
    """
    options: dict[str, Any] = {
        "max_tokens": max_tokens,
        "stop_tokens": [[t] for t in sorted(sharded.tokenizer.eos_token_ids)],
    }
    if max_batch is not None:
        options["completion_batch_size"] = max_batch
    options["prefill_step_size"] = prefill_step(sharded)
    sharing = _token_sharing(sharded)
    if sharing is None:
        return BatchGenerator(sharded.model, sampler=sampler, **options)
    return _SharedTokensBatchGenerator(sharded.model, sharing, sampler=sampler, **options)


class _SharedTokensBatchGenerator(BatchGenerator):
    """mlx-lm's `BatchGenerator` whose every sampler goes through `sharing`."""

    def __init__(
        self, model: Any, sharing: TokenSharing, *, sampler: Callable | None, **options: Any
    ):
        super().__init__(model, sampler=sharing.share(sampler), **options)
        self._sharing = sharing

    def insert(self, prompts: Any, *args: Any, samplers: Any = None, **kwargs: Any) -> Any:
        # None stays None: such requests use the generator's own (shared) sampler, so a
        # batch of them still samples in one call and shares its tokens in one all-sum.
        if samplers is not None:
            samplers = [None if s is None else self._sharing.share(s) for s in samplers]
        return super().insert(prompts, *args, samplers=samplers, **kwargs)


def _token_sharing(sharded: ShardedModel) -> TokenSharing | None:
    """How the ranks of a pipeline get rank 0's tokens; None where every rank samples."""
    if sharded.plan.strategy != PIPELINE or sharded.group is None or sharded.world_size == 1:
        return None
    # mlx-lm's own pipeline() passes hidden states on the generation stream; its tokens
    # stay there too, so that no two of its collectives ever run at once.
    generic = sharded.plan.implementation == GENERIC_PIPELINE
    return TokenSharing(sharded.group, stream=hop_stream() if generic else None)


def insert(
    generator: Any,
    batch: Sequence[EncodedPrompt],
    *,
    samplers: Sequence[Callable[[mx.array], mx.array] | None] | None = None,
    starts: Sequence[Start | None] | None = None,
) -> list[int]:
    """Queue `batch` on `generator`; returns each prompt's uid, in order.

    `samplers`: one per prompt (None: the generator's own); default: the generator's own.
    `starts`: one per prompt (None: from scratch): a KV cache that already holds the tokens
    before the prompt's `ids`, so only `ids` are prefilled.
    """
    starts = list(starts) if starts is not None else [None] * len(batch)
    return generator.insert(
        [item.ids for item in batch],
        max_tokens=[item.max_tokens for item in batch],
        samplers=list(samplers) if samplers is not None else None,
        caches=[s.cache if s is not None else None for s in starts],
        all_tokens=[list(s.tokens) if s is not None else [] for s in starts],
    )


@dataclass(frozen=True)
class Start:
    """A KV cache to start a sequence from, and the tokens it holds."""

    tokens: list[int]
    cache: list[Any]


def step(
    generator: Any, *, on_finished: Callable[[int, Start], None] | None = None
) -> list[Token] | None:
    """Run `generator` one step: the tokens it produced (none while it reads prompts).

    Args:
        generator: A `batch_generator`.
        on_finished: Called with (uid, what its KV cache holds) for each sequence that
            finished in this step, before its token is returned.

    Returns:
        The step's tokens, or None when no request is left.
    """
    prompt_responses, responses = generator.next()
    if not prompt_responses and not responses:
        return None
    if on_finished is not None:
        for r in responses:
            if r.finish_reason is not None and r.prompt_cache is not None:
                on_finished(r.uid, Start(tokens=list(r.all_tokens), cache=r.prompt_cache))
    tokens = [_token(r.uid, r, start=False) for r in responses]
    # One evaluation for the step's log-probabilities, not one per sequence: on a GPU each
    # evaluation is a submission of its own.
    mx.async_eval([t.logprob_array for t in tokens])
    return tokens


def complete(
    item: EncodedPrompt, tokens: Sequence[Token], text: str, *, started: float, ended: float
) -> Completion:
    """The completion of `item` from every token it produced.

    Args:
        item: The prompt.
        tokens: Its tokens, in order (the last one says why it finished, if it did).
        text: The completion's text.
        started: `time.perf_counter()` when generation started; timings count from it.
        ended: `time.perf_counter()` when generation ended: the end of a request that
            did not finish.

    Returns:
        The completion, without the end-of-sequence token.
    """
    kept = [t for t in tokens if t.finish_reason != "stop"]
    last = tokens[-1] if tokens and tokens[-1].finish_reason else None
    return Completion(
        id=item.prompt.id,
        prompt=item.prompt.text,
        completion=text,
        token_ids=[t.id for t in kept],
        logprobs=[t.logprob for t in kept],
        prompt_tokens=len(item.ids),
        generation_tokens=len(tokens),
        finish_reason=last.finish_reason if last else "length",
        ttft_seconds=(tokens[0].time if tokens else ended) - started,
        seconds=(last.time if last else ended) - started,
    )


def _token(uid: int, response: Any, *, start: bool = True) -> Token:
    """A `Token` from mlx-lm's response (streaming or batched, which share these fields).

    `start`: begin evaluating its log-probability now (else the caller does, for a step).
    """
    logprob = response.logprobs[response.token]
    if start:
        mx.async_eval(logprob)
    return Token(
        uid=uid,
        id=response.token,
        logprob_array=logprob,
        finish_reason=response.finish_reason,
        time=time.perf_counter(),
    )


def _nothing(*_: Any) -> None:
    pass
