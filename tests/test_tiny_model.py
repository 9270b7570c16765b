import hashlib
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm import stream_generate

from tests.support.tiny_model import (
    INDEX_FILE,
    SINGLE_FILE,
    SUPPORTED_ARCHS,
    main,
    make_tiny_model,
)

# Small enough that the whole file runs in seconds, big enough for four shards.
SMALL = {"num_layers": 4, "hidden_size": 32, "num_heads": 4, "num_kv_heads": 2}
PROMPTS = ["The weather in the mountains", "1, 2, 3,", "Why is the sea salty?"]


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def _greedy_tokens(model, tokenizer, prompt: str, max_tokens: int = 16) -> list[int]:
    return [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens)]


def _layer(name: str) -> int | None:
    return int(name.split(".")[2]) if name.startswith("model.layers.") else None


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_every_arch_loads_and_generates_varied_text(tmp_path, arch, tie):
    if arch == "gemma" and not tie:
        pytest.raises(ValueError, make_tiny_model, tmp_path / "m", arch=arch, tie_embeddings=tie)
        return
    path = make_tiny_model(tmp_path / "m", arch=arch, tie_embeddings=tie, **SMALL)

    model, tokenizer = mlx_lm.load(str(path))

    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == arch
    assert config["tie_word_embeddings"] is tie
    weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    assert ("lm_head.weight" in weight_map) is not tie
    for prompt in PROMPTS:
        tokens = _greedy_tokens(model, tokenizer, prompt)
        # Special tokens have zero logits, so nothing stops generation early.
        assert len(tokens) == 16
        assert len(set(tokens)) > 1, f"{arch} repeats one token for {prompt!r}"
        text = tokenizer.decode(tokens)
        assert text.strip()
        assert "\ufffd" not in text


def test_default_model_generates_with_chat_template(tmp_path):
    path = make_tiny_model(tmp_path / "m")
    model, tokenizer = mlx_lm.load(str(path))

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me about soup."}], add_generation_prompt=True
    )
    text = mlx_lm.generate(model, tokenizer, prompt, max_tokens=16)

    config = json.loads((path / "config.json").read_text())
    assert tokenizer.has_chat_template
    assert tokenizer.bos_token_id == config["bos_token_id"]
    assert tokenizer.eos_token_id == config["eos_token_id"]
    assert prompt[0] == tokenizer.bos_token_id
    assert tokenizer.eos_token_ids == {2}
    assert text.strip()


def test_index_maps_every_weight_to_the_file_holding_it(tmp_path):
    path = make_tiny_model(tmp_path / "m", num_shards=4, **SMALL)

    index = json.loads((path / INDEX_FILE).read_text())
    weight_map = index["weight_map"]
    files = sorted(path.glob("model-*.safetensors"))
    assert [f.name for f in files] == [f"model-{k:05d}-of-00004.safetensors" for k in (1, 2, 3, 4)]
    assert set(weight_map.values()) == {f.name for f in files}
    seen: dict[str, str] = {}
    total = 0
    for f in files:
        for name, array in mx.load(str(f)).items():
            assert array.dtype == mx.float32
            seen[name] = f.name
            total += array.nbytes
    assert seen == weight_map
    assert index["metadata"]["total_size"] == total
    assert not (path / SINGLE_FILE).exists()


@pytest.mark.parametrize("num_shards", [2, 3, 4, 6])
def test_layers_are_split_into_contiguous_blocks(tmp_path, num_shards):
    path = make_tiny_model(tmp_path / "m", num_layers=6, hidden_size=32, num_shards=num_shards)

    weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    blocks = []
    for f in files:
        layers = {_layer(n) for n, file in weight_map.items() if file == f} - {None}
        assert layers == set(range(min(layers), max(layers) + 1)), f"{f} holds {layers}"
        blocks.append(sorted(layers))
    assert [layer for block in blocks for layer in block] == list(range(6))
    assert weight_map["model.embed_tokens.weight"] == files[0]
    assert weight_map["model.norm.weight"] == files[-1]
    assert weight_map["lm_head.weight"] == files[-1]


def test_same_arguments_give_identical_bytes(tmp_path):
    first = make_tiny_model(tmp_path / "a", arch="qwen2", **SMALL)
    second = make_tiny_model(tmp_path / "b", arch="qwen2", **SMALL)

    assert _digests(first) == _digests(second)
    assert len(_digests(first)) == 4 + 1 + 4  # shards, index, config and tokenizer files


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_models_keep_float32_norms_like_real_checkpoints(tmp_path, dtype):
    path = make_tiny_model(tmp_path / "m", arch="qwen3", num_shards=1, dtype=dtype)
    weights = mx.load(str(path / "model.safetensors"))
    norms = {n for n in weights if n.endswith("norm.weight")}
    assert {"model.norm.weight", "model.layers.0.self_attn.q_norm.weight"} <= norms
    assert {str(weights[n].dtype) for n in norms} == {"mlx.core.float32"}
    assert {str(w.dtype) for n, w in weights.items() if n not in norms} == {f"mlx.core.{dtype}"}
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == dtype
    model, tokenizer = mlx_lm.load(str(path))
    assert len(list(stream_generate(model, tokenizer, "The morning", max_tokens=4))) == 4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_moe_checkpoint_stores_each_expert_and_keeps_routers_float32(tmp_path, dtype):
    experts = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8}
    path = make_tiny_model(
        tmp_path / "m", arch="qwen3_moe", num_shards=1, dtype=dtype, **experts, **SMALL
    )

    weights = mx.load(str(path / SINGLE_FILE))
    mlp = "model.layers.0.mlp."
    assert {n.removeprefix(mlp) for n in weights if n.startswith(mlp)} == {"gate.weight"} | {
        f"experts.{e}.{p}_proj.weight" for e in range(4) for p in ("gate", "up", "down")
    }
    assert weights[mlp + "gate.weight"].dtype == mx.float32  # the router, as in real ones
    assert weights[mlp + "experts.3.down_proj.weight"].shape == (32, 8)
    assert weights[mlp + "experts.3.down_proj.weight"].dtype == getattr(mx, dtype)
    config = json.loads((path / "config.json").read_text())
    assert {k: config[k] for k in experts} == experts
    # mlx-lm's sanitize stacks the experts into one switch_mlp per layer.
    model, tokenizer = mlx_lm.load(str(path))
    assert model.model.layers[0].mlp.switch_mlp.down_proj.weight.shape == (4, 32, 8)
    assert len(list(stream_generate(model, tokenizer, "The morning", max_tokens=4))) == 4


def test_seed_changes_weights_but_not_tokenizer(tmp_path):
    a = _digests(make_tiny_model(tmp_path / "a", seed=0, **SMALL))
    b = _digests(make_tiny_model(tmp_path / "b", seed=1, **SMALL))

    assert a["tokenizer.json"] == b["tokenizer.json"]
    assert a["model-00001-of-00004.safetensors"] != b["model-00001-of-00004.safetensors"]


def test_single_shard_writes_one_file_without_index_and_same_tensors(tmp_path):
    single = make_tiny_model(tmp_path / "one", num_shards=1, **SMALL)
    sharded = make_tiny_model(tmp_path / "four", num_shards=4, **SMALL)

    assert sorted(p.name for p in single.glob("*.safetensors")) == [SINGLE_FILE]
    assert not (single / INDEX_FILE).exists()
    tensors = mx.load(str(single / SINGLE_FILE))
    sharded_tensors = {}
    for f in sharded.glob("model-*.safetensors"):
        sharded_tensors.update(mx.load(str(f)))
    assert tensors.keys() == sharded_tensors.keys()
    assert all(mx.array_equal(tensors[k], sharded_tensors[k]).item() for k in tensors)

    model, tokenizer = mlx_lm.load(str(single))
    assert len(set(_greedy_tokens(model, tokenizer, PROMPTS[0]))) > 1


def test_weights_dominate_preset_is_large_and_loads(tmp_path):
    path = make_tiny_model(tmp_path / "m", hidden_size=256, intermediate_size=1024, num_layers=8)

    total = json.loads((path / INDEX_FILE).read_text())["metadata"]["total_size"]
    assert total > 30_000_000
    model, tokenizer = mlx_lm.load(str(path))
    assert len(set(_greedy_tokens(model, tokenizer, PROMPTS[0]))) > 1


def test_vocab_beyond_the_corpus_is_padded_with_reserved_tokens(tmp_path):
    path = make_tiny_model(tmp_path / "m", vocab_size=2048, num_shards=1, **SMALL)

    model, tokenizer = mlx_lm.load(str(path))

    assert len(tokenizer.get_vocab()) == 2048
    assert tokenizer.convert_ids_to_tokens(2047).startswith("<|reserved_")
    assert "<|reserved" not in tokenizer.decode(_greedy_tokens(model, tokenizer, PROMPTS[0]))


def test_refuses_a_non_empty_directory_unless_overwriting(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    with pytest.raises(FileExistsError):
        make_tiny_model(out, **SMALL)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    make_tiny_model(out, overwrite=True, **SMALL)
    assert not (out / "keep.txt").exists()
    assert (out / "config.json").exists()
    # Neither the temporary build directory nor the old copy is left next to it.
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_an_empty_existing_directory_is_filled(tmp_path):
    out = tmp_path / "m"
    out.mkdir()

    make_tiny_model(out, **SMALL)

    assert (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"arch": "gpt2"},
        {"num_layers": 2, "num_shards": 3},
        {"hidden_size": 30, "num_heads": 4},
        {"num_heads": 4, "num_kv_heads": 3},
        {"vocab_size": 100},
        {"arch": "llama", "num_experts": 4},
        {"arch": "qwen3_moe", "num_experts": 2, "num_experts_per_tok": 3},
        {"arch": "qwen3_moe", "moe_intermediate_size": 0},
    ],
)
def test_rejects_sizes_that_do_not_fit(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_tiny_model(tmp_path / "m", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_cli_prints_the_model_directory(tmp_path, capsys):
    out = tmp_path / "m"

    code = main([str(out), "--arch", "phi3", "--layers", "2", "--shards", "2", "--seed", "3"])

    assert code == 0
    assert capsys.readouterr().out == f"{out}\n"
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert len(list(out.glob("model-*-of-00002.safetensors"))) == 2


def test_cli_reports_errors_on_one_line(tmp_path, capsys):
    code = main([str(tmp_path / "m"), "--layers", "1", "--shards", "2"])

    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_module_runs_as_a_script(tmp_path):
    out = tmp_path / "m"
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.tiny_model", str(out), "--shards", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == f"{out}\n"
    assert (out / SINGLE_FILE).exists()
