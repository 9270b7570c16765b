"""Loading and generation as plain functions, in one process, with no process group.

What a long-running server does: load once, then generate many times (one-shot, or step by
step over mlx-lm's continuous batching), and greedy ids must equal mlx-lm's every time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_engine import BATCH, MAX_TOKENS, PROMPT, reference

from mlxnode.config import Config
from mlxnode.generation import Token, batch_generator, complete, encode, generate, insert, step
from mlxnode.loading import ShardedModel, load_sharded
from mlxnode.prompts import Prompt
from tests.support.tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("generation") / "llama", arch="llama")


@pytest.fixture(scope="module")
def sharded(model_dir: Path) -> ShardedModel:
    config = Config()
    config.model.path = str(model_dir)
    return load_sharded(config)


def _encode(sharded: ShardedModel, *texts: str):
    prompts = [Prompt(i, text) for i, text in enumerate(texts)]
    return encode(
        sharded.tokenizer,
        prompts,
        max_tokens=MAX_TOKENS,
        chat_template=False,
        context_length=sharded.context_length,
        model_name=sharded.name,
    )


def test_load_once_generate_twice_equals_mlx_lm(sharded, model_dir):
    assert sharded.group is None and sharded.plan.strategy == "local"
    assert (sharded.rank, sharded.world_size) == (0, 1)
    expected = reference(model_dir, PROMPT)
    steps = []
    for _ in range(2):
        pieces: list[str] = []
        result = generate(
            sharded,
            _encode(sharded, PROMPT),
            on_step=lambda: steps.append(1),
            on_text=pieces.append,
        )
        (done,) = result.completions
        assert done.token_ids == expected and len(done.logprobs) == len(expected)
        assert "".join(pieces) == done.completion and not result.batched
    assert len(steps) >= 2 * MAX_TOKENS  # the watchdog's beat, once a step at least
    for _ in range(2):
        result = generate(sharded, _encode(sharded, *BATCH[:3]))
        assert result.batched
        assert [c.token_ids for c in result.completions] == [
            reference(model_dir, p) for p in BATCH[:3]
        ]


def test_a_request_joins_a_running_batch_step_by_step(sharded, model_dir):
    """A server's loop: insert while others generate, step until nothing is left."""
    first, second = _encode(sharded, BATCH[0], BATCH[1])
    generator = batch_generator(sharded, max_tokens=MAX_TOKENS)
    tokens: dict[int, list[Token]] = {}
    try:
        (uid_first,) = insert(generator, [first])
        for _ in range(3):
            for token in step(generator) or []:
                tokens.setdefault(token.uid, []).append(token)
        (uid_second,) = insert(generator, [second])
        while (produced := step(generator)) is not None:
            for token in produced:
                tokens.setdefault(token.uid, []).append(token)
    finally:
        generator.close()
    for uid, item in ((uid_first, first), (uid_second, second)):
        ids = [t.id for t in tokens[uid] if t.finish_reason != "stop"]
        done = complete(item, tokens[uid], sharded.tokenizer.decode(ids), started=0.0, ended=1.0)
        assert done.token_ids == reference(model_dir, item.prompt.text)
        assert done.finish_reason == "length" and done.generation_tokens == MAX_TOKENS
