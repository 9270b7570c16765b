"""Bad input, never a traceback: the real CLI, in subprocesses, fed garbage.

Every bad flag, prompt, prompts file, model id or path, config file and inventory must
give one stderr line naming the culprit and a documented exit code (README "Exit
codes"), and must leave what is already on disk alone. Hypothesis builds argv from
the real flag names; examples are few because every one starts a Python process.

Documented choices these tests pin:
- control characters (NUL, ESC, DEL...) in a prompt given as text or in a plain-text
  prompts file are passed to the tokenizer as they are and the prompt runs; raw
  control characters inside a JSONL string are invalid JSON, so that file is refused
  with its line number (exit 2);
- undecodable bytes (stdin, a file or argv) are refused with exit 2;
- a UTF-8 BOM is ignored, CRLF line ends and trailing blank lines are accepted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxnode.commands.cache import ACTION_KEYS
from mlxnode.commands.common import CONFIG_FLAGS

REPO = Path(__file__).resolve().parent.parent
OK_CODES = {0, 2, 3, 4, 5, 7}
FUZZ = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# -- fixtures and helpers


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny model, a cache, an HF home and a sentinel outside the cache."""
    from tests.support.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("bad_input")
    model = root / "model"
    make_tiny_model(model, arch="llama", num_layers=4, num_shards=2)
    cache = root / "cache"
    cache.mkdir()
    sentinel = root / "outside" / "keep.txt"
    sentinel.parent.mkdir()
    sentinel.write_text("keep me")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MLXNODE_") and k not in ("HF_TOKEN", "HF_ENDPOINT")
    }
    env.update(
        MLXNODE_CACHE_DIR=str(cache),
        HF_HOME=str(root / "hf"),
        XDG_CACHE_HOME=str(root / "xdg"),
        HF_HUB_OFFLINE="1",
        PYTHONIOENCODING="utf-8",
    )
    work = root / "work"
    work.mkdir()
    return {
        "root": root,
        "model": model,
        "cache": cache,
        "sentinel": sentinel,
        "env": env,
        "work": work,
    }


def cli(sandbox: dict, *args: str, stdin: bytes | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "mlxnode", *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        env=sandbox["env"],
        cwd=sandbox["work"],
        timeout=timeout,
    )


def check(proc: subprocess.CompletedProcess, codes=OK_CODES, *, names: str | None = None) -> str:
    """Exit code documented, no traceback, a one-line `mlxnode...error:` last line; return it."""
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode in codes, (proc.args, proc.returncode, err[-2000:])
    assert "Traceback" not in err, (proc.args, err[-2000:])
    if proc.returncode == 0:
        return ""
    last = err.rstrip("\n").rsplit("\n", 1)[-1]
    assert last.startswith("mlxnode") and "error:" in last, (proc.args, err[-2000:])
    if names is not None:
        assert names.lower() in last.lower(), (names, last)
    return last


def _flags(*sections: str) -> list[str]:
    return [
        f.flags[0]
        for f in CONFIG_FLAGS
        if f.kind == "value"
        and f.key.split(".")[0] in sections
        # paths that could write outside the sandbox are tested on their own below
        and f.key not in ("logging.file", "cache.dir", "model.path", "model.name")
    ]


GARBAGE = st.one_of(
    st.sampled_from(
        [
            "-1",
            "0",
            "nan",
            "NaN",
            "inf",
            "-inf",
            "1e400",
            "",
            " ",
            "1000000000000",
            "-99999999999999999999",
            "0,4",
            "-1,2",
            ",",
            "1,,2",
            "1.5",
            "ü∞",
            "/nonexistent/x",
            "../..",
            "{{ }}",
            "{% if %}",
            "true",
        ]
    ),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12),
)


def _argv(flag_names: list[str], extra_bool: list[str] = ()):
    pairs = st.lists(st.tuples(st.sampled_from(flag_names), GARBAGE), min_size=1, max_size=3)
    bools = st.lists(st.sampled_from(list(extra_bool) or ["--offline"]), max_size=2)
    # `--flag=value`, so a value starting with '-' is still a value.
    return st.builds(lambda p, b: [f"{k}={v}" for k, v in p] + b, pairs, bools)


# -- 1. flags


@FUZZ
@given(argv=_argv(_flags("generation", "cache", "logging", "distributed", "model") + ["--run-id"]))
def test_run_flags(sandbox, argv):
    proc = cli(
        sandbox,
        "run",
        "--model-path",
        str(sandbox["model"]),
        "--offline",
        "--max-tokens",
        "2",
        *argv,
        "hi",
    )
    check(proc)


CACHE_ARGS = {
    "list": ["--json"],
    "size": ["--json"],
    "clear": ["--yes"],
    "prewarm": ["--all", "--dry-run", "--json", "--quiet"],
    "verify": ["--all", "--json"],
}


_OFFERED = {
    verb: {f.flags[0] for f in CONFIG_FLAGS if f.key in keys} for verb, keys in ACTION_KEYS.items()
}


@pytest.mark.parametrize("verb", sorted(CACHE_ARGS))
@settings(FUZZ, max_examples=15)
@given(data=st.data())
def test_cache_flags(sandbox, verb, data):
    # Only the settings the action offers: any other flag is refused by argparse at once.
    names = [n for n in _flags("model", "cache", "logging", "distributed") if n in _OFFERED[verb]]
    if verb in ("prewarm", "verify"):
        names += ["--rank", "--ranks", "--world-size"]
    argv = data.draw(_argv(names, CACHE_ARGS[verb]))
    if verb != "list" and data.draw(st.booleans()):
        argv.append(data.draw(GARBAGE))  # the MODEL positional
    proc = cli(sandbox, "cache", verb, "--offline", *argv)
    check(proc)
    assert sandbox["sentinel"].read_text() == "keep me"


@settings(FUZZ, max_examples=20)
@given(argv=_argv(_flags("model", "generation", "cache", "logging", "distributed"), ["--json"]))
def test_config_show_flags(sandbox, argv):
    check(cli(sandbox, "config", "show", *argv))


def _hostfiles(root: Path) -> list[str]:
    d = root / "hostfiles"
    d.mkdir(exist_ok=True)
    files = {
        "empty.json": "",
        "brace.json": "{",
        "list.json": "[]",
        "ints.json": "[1, 2]",
        "obj.json": '{"a": 1}',
        "noips.json": '[{"ips": []}]',
        "nul.json": "\x00",
    }
    for name, text in files.items():
        (d / name).write_text(text)
    return [str(d / n) for n in files] + [str(d / "missing.json"), str(d)]


@pytest.mark.parametrize("verb", ["launch", "preflight"])
@settings(FUZZ, max_examples=15)
@given(data=st.data())
def test_launch_and_preflight_flags(sandbox, verb, data):
    hostfile = data.draw(st.sampled_from(_hostfiles(sandbox["root"])))
    names = ["--python", "--starting-port", "--connect-timeout"]
    if verb == "launch":
        names += ["--backend", "--run-id", "--timeout"]
    argv = data.draw(_argv(names, ["--json"] if verb == "preflight" else ["--no-preflight"]))
    extra = []
    if verb == "launch":
        lock = sandbox["root"] / "launch.lock"
        extra = ["--lock-file", str(lock), "--", "--max-tokens", "1", "hi"]
    proc = cli(sandbox, verb, "--hostfile", hostfile, *argv, *extra, timeout=60)
    check(proc, {2})


@pytest.mark.parametrize(
    ("flag", "value", "culprit"),
    [
        ("--temperature", "nan", "--temperature"),
        ("--temperature", "inf", "--temperature"),
        ("--top-p", "0", "--top-p"),
        ("--top-p", "nan", "--top-p"),
        ("--split", "0,4", "--split"),
        ("--weights", "-1,2", "--weights"),
        ("--weights", "nan,1", "--weights"),
        ("--seed", "-1", "--seed"),
        ("--seed", "99999999999999999999", "--seed"),
        ("--step-timeout", "inf", "--step-timeout"),
        ("--max-tokens", "0", "--max-tokens"),
    ],
)
def test_named_bad_values(sandbox, flag, value, culprit):
    proc = cli(sandbox, "run", "--model-path", str(sandbox["model"]), f"{flag}={value}", "hi")
    assert proc.returncode == 2
    check(proc, {2}, names=culprit)


def test_huge_max_tokens_is_clamped_to_the_context(sandbox):
    proc = cli(
        sandbox, "run", "--model-path", str(sandbox["model"]), "--max-tokens", str(10**12), "hi"
    )
    check(proc, {0})
    assert b"fit the model's context" in proc.stderr


@pytest.mark.parametrize("template", ["{{ }}", "{% if %}", "{{ undefined_fn() }}"])
def test_broken_chat_template_flag(sandbox, template):
    proc = cli(
        sandbox,
        "run",
        "--model-path",
        str(sandbox["model"]),
        "--max-tokens",
        "1",
        "--chat-template",
        template,
        "hi",
    )
    check(proc, {2, 5, 7}, names="template")


@pytest.mark.parametrize("kind", ["directory", "under_a_file"])
def test_bad_log_file(sandbox, tmp_path, kind):
    target = tmp_path / "logs" if kind == "directory" else tmp_path / "f" / "x.log"
    if kind == "directory":
        target.mkdir()
    else:
        (tmp_path / "f").write_text("")
    proc = cli(sandbox, "config", "show", "--log-file", str(target))
    check(proc, {0, 2})


# -- 2. prompts


def _run(sandbox, *args, stdin=None):
    return cli(
        sandbox,
        "run",
        "--model-path",
        str(sandbox["model"]),
        "--max-tokens",
        "2",
        *args,
        stdin=stdin,
    )


@pytest.mark.parametrize("words", [[""], ["   "], ["\t\n"], ["", " "]])
def test_empty_prompt(sandbox, words):
    check(_run(sandbox, *words), {2}, names="empty")


def test_megabyte_prompt_is_refused_before_compute(sandbox, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("word " * 200_000)
    proc = _run(sandbox, "--prompts-file", str(big))
    check(proc, {7}, names="context")
    assert b"loaded" not in proc.stderr  # refused before the weights were read
    proc = _run(sandbox, "-", stdin=b"word " * 200_000)
    check(proc, {7}, names="context")


def test_invalid_utf8(sandbox, tmp_path):
    check(_run(sandbox, "-", stdin=b"\xff\xfe not utf-8\n"), {2}, names="UTF-8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xc3\x28\n")
    check(_run(sandbox, "--prompts-file", str(bad)), {2}, names=str(bad))
    check(_run(sandbox, os.fsdecode(b"\xff")), {2}, names="UTF-8")


@pytest.mark.parametrize("text", ["a\x01b", "\x1b[31mred\x1b[0m", "del\x7f", "tab\tbell\x07"])
def test_control_characters_run(sandbox, text):
    check(_run(sandbox, text), {0})


def test_nul_in_prompt_text_file_runs(sandbox, tmp_path):
    f = tmp_path / "nul.txt"
    f.write_bytes(b"a\x00b\n")
    check(_run(sandbox, "--prompts-file", str(f)), {0})
    check(_run(sandbox, "-", stdin=b"a\x00b\n"), {0})


@pytest.mark.parametrize("text", ["{{ }}", "{% endif %}", "{{ messages[0]['content'] }}"])
def test_template_breaking_prompt_runs(sandbox, text):
    check(_run(sandbox, text), {0})


# -- 3. prompts files

BAD_LINES = {
    "bad_json": '{"prompt": ',
    "not_object": "[1, 2]",
    "string": '"just a string"',
    "no_prompt": '{"id": "x"}',
    "empty_prompt": '{"prompt": "   "}',
    "int_prompt": '{"prompt": 3}',
    "null_prompt": '{"prompt": null}',
    "float_id": '{"id": 1.5, "prompt": "x"}',
    "bool_id": '{"id": true, "prompt": "x"}',
    "list_id": '{"id": [1], "prompt": "x"}',
    "raw_control": '{"prompt": "a\x01b"}',
}


@st.composite
def prompt_files(draw):
    n = draw(st.integers(1, 4))
    lines = [json.dumps({"id": f"p{i}", "prompt": f"hello {i}"}) for i in range(n)]
    bad_at = None
    if draw(st.booleans()):
        kind = draw(st.sampled_from([*BAD_LINES, "duplicate"]))
        pos = draw(st.integers(1, n))  # never first: the first line decides the format
        line = (
            json.dumps({"id": "p0", "prompt": "again"})
            if kind == "duplicate"
            else (BAD_LINES[kind])
        )
        lines.insert(pos, line)
        bad_at = pos + 1
    bom = draw(st.booleans())
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    trailing = draw(st.integers(0, 2))
    text = ("\ufeff" if bom else "") + eol.join(lines) + eol + eol * trailing
    return text, bad_at, n


@settings(FUZZ, max_examples=15)
@given(spec=prompt_files(), existing=st.booleans())
def test_prompts_files(sandbox, spec, existing):
    text, bad_at, n = spec
    d = sandbox["root"] / "pf"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    pfile, out = d / "prompts.jsonl", d / "out.jsonl"
    pfile.write_bytes(text.encode("utf-8"))
    if existing:
        out.write_text("previous results\n")
    proc = _run(sandbox, "--prompts-file", str(pfile), "--output", str(out))
    if bad_at is not None:
        check(proc, {2}, names=f"line {bad_at}")
        if existing:
            assert out.read_text() == "previous results\n"
        else:
            assert not out.exists()
        # nothing half-written either: no temporary file left next to the output
        assert {p.name for p in d.iterdir()} == {"prompts.jsonl"} | (
            {"out.jsonl"} if existing else set()
        )
    else:
        check(proc, {0})
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["id"] for r in records] == [f"p{i}" for i in range(n)]


def test_line_separator_inside_a_json_string(sandbox, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": 1, "prompt": "a\u2028b\u0085c"}\n', encoding="utf-8")
    out = tmp_path / "o.jsonl"
    check(_run(sandbox, "--prompts-file", str(f), "--output", str(out)), {0})
    records = out.read_text(encoding="utf-8").split("\n")
    assert json.loads(records[0])["prompt"] == "a\u2028b\u0085c" and records[1:] == [""]


# -- 4. model ids and paths

BAD_IDS = [
    "../..",
    "/etc",
    "org/../../x",
    "a/b/c",
    "..",
    "ünï/cödé",
    "a" * 300 + "/b",
    "org/name.git",
    "org--x/y",
    "./x",
]


@pytest.mark.parametrize("repo", BAD_IDS)
def test_bad_model_ids(sandbox, repo):
    name = repr(repo)[:40]
    check(cli(sandbox, "run", "--offline", "--model", repo, "hi"), {2, 3}, names=name)
    for verb in ("prewarm", "verify", "size"):
        check(cli(sandbox, "cache", verb, "--offline", repo), {2, 3}, names=name)
    check(cli(sandbox, "cache", "clear", "--yes", repo), {2, 3}, names=name)
    assert sandbox["sentinel"].read_text() == "keep me"


def test_empty_model_id_is_not_clear_all(sandbox):
    keep = sandbox["cache"] / "org--keep"
    keep.mkdir(exist_ok=True)
    check(cli(sandbox, "cache", "clear", "--yes", ""), {2, 3})
    assert keep.is_dir()
    keep.rmdir()


def test_symlink_in_cache_pointing_outside(sandbox):
    outside = sandbox["sentinel"].parent
    link = sandbox["cache"] / "evil--link"
    link.symlink_to(outside, target_is_directory=True)
    try:
        check(cli(sandbox, "cache", "list"), {0, 3})
        check(cli(sandbox, "cache", "size"), {0, 3})
        check(cli(sandbox, "cache", "size", "evil/link"), {0, 2, 3})
        check(cli(sandbox, "cache", "verify", "--offline", "evil/link"), {2, 3})
        check(cli(sandbox, "cache", "clear", "--yes", "evil/link"), {0, 2, 3})
        check(cli(sandbox, "cache", "clear", "--yes"), {0, 2, 3})
        assert sandbox["sentinel"].read_text() == "keep me"
    finally:
        if link.is_symlink():
            link.unlink()


@pytest.fixture(scope="module")
def broken_models(sandbox) -> dict[str, Path]:
    root = sandbox["root"] / "broken"
    root.mkdir()
    good = sandbox["model"]
    out = {"missing": root / "missing", "file": root / "file", "empty": root / "empty"}
    out["file"].write_text("not a dir")
    out["empty"].mkdir()
    for name in ("bad_json", "list_json", "truncated_header", "truncated_data", "no_tok"):
        shutil.copytree(good, root / name)
        out[name] = root / name
    (root / "bad_json" / "config.json").write_text('{"model_type": ')
    (root / "list_json" / "config.json").write_text("[1, 2]")
    shard = "model-00001-of-00002.safetensors"
    with open(root / "truncated_header" / shard, "r+b") as f:
        f.truncate(100)
    size = (root / "truncated_data" / shard).stat().st_size
    with open(root / "truncated_data" / shard, "r+b") as f:
        f.truncate(size - 10)
    for tok in (root / "no_tok").glob("tokenizer*"):
        tok.unlink()
    return out


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "file",
        "empty",
        "bad_json",
        "list_json",
        "truncated_header",
        "truncated_data",
        "no_tok",
    ],
)
def test_bad_model_path(sandbox, broken_models, case):
    path = broken_models[case]
    proc = _run(sandbox, "--model-path", str(path), "hi")
    check(proc, {2, 3, 5}, names=str(path))


# -- 5. config files (gaps left by tests/test_config.py)


def _config(sandbox, path: Path | str):
    return cli(sandbox, "config", "show", "--config", str(path), timeout=30)


def test_config_is_a_directory_or_fifo(sandbox, tmp_path):
    check(_config(sandbox, tmp_path), {2}, names=str(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    check(_config(sandbox, fifo), {2}, names=str(fifo))


def test_huge_config_file(sandbox, tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("model:\n  name: org/x\n" + "#" * (10 * 2**20) + "\n")
    check(_config(sandbox, big), {2}, names=str(big))


def test_billion_laughs_does_not_hang(sandbox, tmp_path):
    levels = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi", strict=True):
        levels.append(f"&{cur} [{','.join(['*' + prev] * 9)}]")
    for key in ("model:\n  name", "distributed:\n  split"):
        f = tmp_path / "bomb.yaml"
        f.write_text(f"{key}: [{', '.join(levels)}]\n")
        proc = _config(sandbox, f)
        last = check(proc, {2}, names=str(f))
        assert len(last) < 2000


# -- 6. inventories, through the cluster filter plugin

PLAYBOOK = """\
- hosts: mlx_cluster
  gather_facts: false
  connection: local
  tasks:
    - name: Build the hostfile the way the roles do.
      run_once: true
      ansible.builtin.debug:
        msg: "{{ order | mlxnode.cluster.mlxnode_hostfile(hostvars) }} {{ layout }}"
      vars:
        order: "{{ groups['mlx_cluster'] | mlxnode.cluster.mlxnode_rank_order(hostvars) }}"
        layout: "{{ mlxnode_split | default([]) | mlxnode.cluster.mlxnode_layout(
                    order | mlxnode.cluster.mlxnode_memory_weights(hostvars), order | length) }}"
"""

# The venv's own ansible-playbook: `make test` does not put .venv/bin on PATH.
ANSIBLE_PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")

INVENTORIES = {
    "duplicate_rank": (
        "a ansible_host=10.0.0.1 mlxnode_rank=0\nb ansible_host=10.0.0.2 mlxnode_rank=0\n",
        "rank 0",
    ),
    "rank_gap": (
        "a ansible_host=10.0.0.1 mlxnode_rank=0\nb ansible_host=10.0.0.2 mlxnode_rank=2\n",
        "rank 1",
    ),
    "rank_missing": (
        "a ansible_host=10.0.0.1 mlxnode_rank=0\nb ansible_host=10.0.0.2\n",
        "mlxnode_rank",
    ),
    "rank_not_int": (
        "a ansible_host=10.0.0.1 mlxnode_rank=zero\nb ansible_host=10.0.0.2 mlxnode_rank=1\n",
        "zero",
    ),
    "weight_missing": (
        "a ansible_host=10.0.0.1 mlxnode_memory_weight=2\nb ansible_host=10.0.0.2\n",
        "mlxnode_memory_weight",
    ),
    "weight_negative": (
        "a ansible_host=10.0.0.1 mlxnode_memory_weight=-1\n"
        "b ansible_host=10.0.0.2 mlxnode_memory_weight=1\n",
        "mlxnode_memory_weight",
    ),
}
SHARED_AND_SPLITS = {
    "duplicate_ansible_host": ("a ansible_host=10.0.0.1\nb ansible_host=10.0.0.1\n", "10.0.0.1"),
    "duplicate_mlx_ip": (
        "a ansible_host=10.0.0.1 mlxnode_mlx_ip=192.168.2.1\n"
        "b ansible_host=10.0.0.2 mlxnode_mlx_ip=192.168.2.1\n",
        "192.168.2.1",
    ),
    "split_wrong_length": (
        "a ansible_host=10.0.0.1\nb ansible_host=10.0.0.2\n"
        "[mlx_cluster:vars]\nmlxnode_split=[2, 1, 1]\n",
        "mlxnode_split",
    ),
    "split_not_positive": (
        "a ansible_host=10.0.0.1\nb ansible_host=10.0.0.2\n"
        "[mlx_cluster:vars]\nmlxnode_split=[4, 0]\n",
        "mlxnode_split",
    ),
    "split_not_int": (
        "a ansible_host=10.0.0.1\nb ansible_host=10.0.0.2\n"
        "[mlx_cluster:vars]\nmlxnode_split=['x', 1]\n",
        "mlxnode_split",
    ),
}


def _inventory_run(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    head, _, tail = body.partition("[mlx_cluster:vars]")
    inventory = "[mlx_cluster]\n" + head + (f"[mlx_cluster:vars]{tail}" if tail else "")
    (tmp_path / "hosts.ini").write_text(inventory)
    (tmp_path / "check.yml").write_text(PLAYBOOK)
    env = dict(os.environ)
    env.update(
        ANSIBLE_COLLECTIONS_PATH=str(REPO / "playbooks" / "collections"),
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "tmp"),
        ANSIBLE_HOME=str(tmp_path / "ansible"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_RETRY_FILES_ENABLED="0",
    )
    return subprocess.run(
        [ANSIBLE_PLAYBOOK, "-i", str(tmp_path / "hosts.ini"), str(tmp_path / "check.yml")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )


@pytest.mark.slow
def test_good_inventory_passes(tmp_path):
    proc = _inventory_run(
        tmp_path, "a ansible_host=10.0.0.1 mlxnode_rank=1\nb ansible_host=10.0.0.2 mlxnode_rank=0\n"
    )
    assert proc.returncode == 0, proc.stdout[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(INVENTORIES))
def test_bad_inventory_is_named(tmp_path, case):
    body, culprit = INVENTORIES[case]
    proc = _inventory_run(tmp_path, body)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert culprit in proc.stdout + proc.stderr, proc.stdout[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(SHARED_AND_SPLITS))
def test_shared_addresses_and_bad_splits_are_named(tmp_path, case):
    body, culprit = SHARED_AND_SPLITS[case]
    proc = _inventory_run(tmp_path, body)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert culprit in proc.stdout + proc.stderr, proc.stdout[-3000:]
