"""The Ansible layer without a testbed: lint, syntax, templates rendered by Ansible, filters.

Templates are rendered by a real `ansible-playbook` run on localhost against a sample
three-host inventory, then parsed by what consumes them: mlxnode's config loader,
mlx.launch's hostfile parser, and plistlib for the macOS LaunchDaemon.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import plistlib
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from mlxnode import readiness

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PLAYBOOKS = sorted((ROOT / "playbooks").glob("*.yml"))
ROLES = ("mlxnode_host", "mlxnode_config", "mlxnode_cache", "mlxnode_run", "mlxnode_serve")


def _tool(name: str) -> str:
    path = VENV_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed")
    return found


def _ansible_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"),
        ANSIBLE_HOME=str(tmp_path / "ansible-home"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
    )
    return env


def _solo_inventory(tmp_path: Path, **group_vars: object) -> Path:
    """A one-host inventory ("solo", this machine) with `group_vars` for the cluster."""
    inventory = tmp_path / "hosts.yml"
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    cluster = {"hosts": {"solo": {}}, "vars": {**local, **group_vars}}
    inventory.write_text(yaml.safe_dump({"mlx_cluster": cluster}))
    return inventory


def _load_filters():
    path = ROOT / "plugins" / "filter" / "mlxnode_cluster.py"
    spec = importlib.util.spec_from_file_location("mlxnode_cluster_filters", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


filters = _load_filters()


# --------------------------------------------------------------------------- lint


@pytest.mark.slow
def test_ansible_lint_production_profile_is_clean():
    proc = subprocess.run(
        [_tool("ansible-lint"), "--nocolor", "--profile", "production"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in proc.stdout + proc.stderr


def test_yamllint_is_clean():
    proc = subprocess.run(
        [_tool("yamllint"), "--strict", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("playbook", PLAYBOOKS, ids=[p.name for p in PLAYBOOKS])
def test_playbook_syntax(playbook, tmp_path):
    proc = subprocess.run(
        [
            _tool("ansible-playbook"),
            "--syntax-check",
            "-i",
            str(ROOT / "inventory" / "example" / "hosts.yml"),
            str(playbook),
        ],
        cwd=ROOT,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        text=True,
        env=_ansible_env(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_playbook_is_checked():
    names = {p.name for p in PLAYBOOKS}
    assert {
        "site.yml",
        "provision.yml",
        "configure.yml",
        "prewarm.yml",
        "run.yml",
        "collect_logs.yml",
        "health.yml",
    } <= names


@pytest.mark.parametrize("role", ROLES)
def test_role_layout(role):
    base = ROOT / "roles" / role
    for rel in (
        "defaults/main.yml",
        "tasks/main.yml",
        "meta/main.yml",
        "README.md",
        "molecule/default/molecule.yml",
        "molecule/default/converge.yml",
        "molecule/default/verify.yml",
    ):
        assert (base / rel).is_file(), f"{role}/{rel} is missing"
    meta = yaml.safe_load((base / "meta/main.yml").read_text())
    assert meta["dependencies"] == []
    assert meta["galaxy_info"]["platforms"]
    defaults = yaml.safe_load((base / "defaults/main.yml").read_text())
    assert all(k.startswith(role + "_") for k in defaults), "defaults must be role-prefixed"
    readme = (base / "README.md").read_text()
    assert "## Role Variables" in readme and "## Example Playbook" in readme
    # The README's "Role Variables" block is the defaults file itself, so it cannot drift.
    body = (base / "defaults/main.yml").read_text().split("\n", 1)[1].strip()
    assert body in readme, f"{role}/README.md is out of date with defaults/main.yml"


def test_example_inventory_parses_and_orders_ranks(tmp_path):
    proc = subprocess.run(
        [
            _tool("ansible-inventory"),
            "-i",
            str(ROOT / "inventory" / "example" / "hosts.yml"),
            "--list",
        ],
        cwd=ROOT,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        text=True,
        env=_ansible_env(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    hosts = data["mlx_cluster"]["hosts"]
    hostvars = data["_meta"]["hostvars"]
    assert len(hosts) == 3
    assert filters.rank_order(hosts, hostvars) == hosts
    assert all("mlxnode_mlx_ip" in hostvars[h] for h in hosts)
    assert hostvars[hosts[0]]["mlxnode_model"]


# --------------------------------------------------------------------------- collection


def _venv_view(at: Path) -> Path:
    """A virtualenv at `at` that is this test run's own (linked), so rendered files land in tmp.

    The roles write config.yaml next to the venv directory and validate it with the venv's
    mlxnode; a linked bin/ alone would start Python without the venv's site-packages.
    """
    at.mkdir()
    real = VENV_BIN.parent
    for name in ("bin", "lib", "lib64", "pyvenv.cfg"):
        if (real / name).exists():
            (at / name).symlink_to(real / name)
    return at


@pytest.fixture(scope="module")
def installed_collection(tmp_path_factory) -> Path:
    """mlxnode.cluster built from the checkout and installed into an empty collections path."""
    tmp = tmp_path_factory.mktemp("collection")
    galaxy = _tool("ansible-galaxy")
    env = {**_ansible_env(tmp), "ANSIBLE_CONFIG": str(tmp / "none.cfg")}
    build = subprocess.run(
        [galaxy, "collection", "build", str(ROOT), "--output-path", str(tmp)],
        cwd=tmp, capture_output=True, stdin=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    version = yaml.safe_load((ROOT / "galaxy.yml").read_text())["version"]
    tarball = tmp / f"mlxnode-cluster-{version}.tar.gz"
    # --no-deps: ansible.posix, community.general and community.crypto come with the
    # `ansible` package here; a user's install fetches them from Galaxy.
    install = subprocess.run(
        [galaxy, "collection", "install", "--no-deps", "-p", str(tmp / "collections"),
         str(tarball)],
        cwd=tmp, capture_output=True, stdin=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    return tmp / "collections"


def _collection_env(tmp_path: Path, collections: Path) -> dict[str, str]:
    """Ansible with no config file at all: only the installed collection."""
    (tmp_path / "none.cfg").write_text("")
    return {
        **_ansible_env(tmp_path),
        "ANSIBLE_CONFIG": str(tmp_path / "none.cfg"),
        "ANSIBLE_COLLECTIONS_PATH": str(collections),
    }


def test_collection_version_is_the_packages():
    galaxy = yaml.safe_load((ROOT / "galaxy.yml").read_text())
    assert (galaxy["namespace"], galaxy["name"]) == ("mlxnode", "cluster")
    from importlib.metadata import version

    assert galaxy["version"] == version("mlxnode")


def test_collection_holds_roles_plugins_playbooks_and_the_source(installed_collection):
    root = installed_collection / "ansible_collections" / "mlxnode" / "cluster"
    for rel in ("plugins/filter/mlxnode_cluster.py", "plugins/lookup/mlxnode_run_raw.py",
                "meta/runtime.yml", "pyproject.toml", "README.md", "mlxnode/cli.py",
                "roles/mlxnode_host/files/build_wheelhouse.py"):  # fmt: skip
        assert (root / rel).is_file(), rel
    assert {p.name for p in (root / "playbooks").glob("*.yml")} == {p.name for p in PLAYBOOKS}
    assert {p.name for p in (root / "roles").iterdir()} == set(ROLES)
    # The checkout's own things stay out (the link to itself would nest the collection).
    for rel in ("tests", "benchmarks", "playbooks/collections", "roles/mlxnode_run/molecule",
                "ansible.cfg", ".venv"):  # fmt: skip
        assert not (root / rel).exists(), rel


def test_every_playbook_of_the_collection_parses_by_its_full_name(installed_collection, tmp_path):
    names = [f"mlxnode.cluster.{p.stem}" for p in PLAYBOOKS]
    proc = subprocess.run(
        [_tool("ansible-playbook"), "--syntax-check", "-i",
         str(ROOT / "inventory" / "example" / "hosts.yml"), *names],
        cwd=tmp_path, capture_output=True, stdin=subprocess.DEVNULL, text=True,
        env=_collection_env(tmp_path, installed_collection),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("playbook: ") == len(names), proc.stdout


def test_collection_configure_renders_without_the_repositorys_ansible_cfg(
    installed_collection, tmp_path
):
    """A real run of mlxnode.cluster.configure: roles and filters from the collection only."""
    from mlxnode.config import load_config

    venv = _venv_view(tmp_path / "venv")
    inventory = _solo_inventory(tmp_path, mlxnode_model="org/name", mlxnode_venv_dir=str(venv))
    argv = [_tool("ansible-playbook"), "-i", str(inventory), "mlxnode.cluster.configure"]
    env = _collection_env(tmp_path, installed_collection)
    for run in ("first", "second"):
        proc = subprocess.run(
            argv, cwd=tmp_path, capture_output=True, stdin=subprocess.DEVNULL, text=True, env=env
        )
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
        recap = re.search(
            r"^solo\s+:\s+ok=\d+\s+changed=(\d+)\s+unreachable=0\s+failed=0", proc.stdout, re.M
        )
        assert recap, proc.stdout[-3000:]
        assert (int(recap[1]) > 0) == (run == "first"), (run, recap[0])
    config = load_config(config_path=tmp_path / "config.yaml", environ={}).config
    assert config.model.name == "org/name"
    assert json.loads((tmp_path / "hosts.json").read_text())[0]["name"] == "solo"


# --------------------------------------------------------------------------- templates

SAMPLE_INVENTORY = {
    "all": {
        "children": {
            "mlx_cluster": {
                "hosts": {
                    # Deliberately not in rank order: mlxnode_rank decides.
                    "mini": {
                        "ansible_host": "192.0.2.13",
                        "mlxnode_mlx_ip": "10.10.0.3",
                        "mlxnode_rank": 2,
                        "mlxnode_memory_weight": 64,
                        "mlxnode_rdma_devices": {"studio": "rdma_en3", "pro": "rdma_en4"},
                    },
                    "studio": {
                        "ansible_host": "192.0.2.11",
                        "mlxnode_mlx_ip": "10.10.0.1",
                        "mlxnode_rank": 0,
                        "mlxnode_memory_weight": 192,
                        "mlxnode_rdma_devices": {"pro": "rdma_en2", "mini": "rdma_en3"},
                    },
                    "pro": {
                        "ansible_host": "192.0.2.12",
                        "mlxnode_rank": 1,
                        "mlxnode_memory_weight": 96,
                        "mlxnode_rdma_devices": {"studio": "rdma_en2", "mini": "rdma_en4"},
                    },
                },
                "vars": {
                    "ansible_connection": "local",
                    "ansible_python_interpreter": sys.executable,
                    "mlxnode_model": "mlx-community/Example-3B-4bit",
                    "mlxnode_strategy": "pipeline",
                    "mlxnode_max_tokens": 64,
                    "mlxnode_cache_dir": "/srv/models",
                },
            }
        }
    }
}


def _render_playbook(out: Path) -> str:
    roles = ROOT / "roles"
    return textwrap.dedent(
        f"""\
        ---
        - name: Render every template for the sample inventory.
          hosts: mlx_cluster
          gather_facts: true
          vars:
            out: "{out}"
          tasks:
            - name: Load the roles' defaults and vars as the roles would.
              ansible.builtin.include_vars:
                file: "{{{{ item }}}}"
              loop:
                - {roles}/mlxnode_config/defaults/main.yml
                - {roles}/mlxnode_config/vars/main.yml
                - {roles}/mlxnode_host/defaults/main.yml
                - {roles}/mlxnode_host/vars/main.yml
            - name: Make the output directory.
              ansible.builtin.file:
                path: "{{{{ out }}}}/{{{{ inventory_hostname }}}}"
                state: directory
                mode: "0755"
            - name: Render config.yaml.
              ansible.builtin.template:
                src: {roles}/mlxnode_config/templates/config.yaml.j2
                dest: "{{{{ out }}}}/{{{{ inventory_hostname }}}}/config.yaml"
                mode: "0644"
            - name: Render the hostfile on the launcher.
              ansible.builtin.template:
                src: {roles}/mlxnode_config/templates/hosts.json.j2
                dest: "{{{{ out }}}}/{{{{ inventory_hostname }}}}/hosts.json"
                mode: "0644"
              when: inventory_hostname == __mlxnode_config_launcher
            - name: Render the LaunchDaemon plist.
              ansible.builtin.template:
                src: {roles}/mlxnode_host/templates/wired-limit.plist.j2
                dest: "{{{{ out }}}}/{{{{ inventory_hostname }}}}/wired-limit.plist"
                mode: "0644"
            - name: Record the facts the templates used.
              ansible.builtin.copy:
                content: "{{{{ {{'memtotal_mb': ansible_facts.memtotal_mb}} | to_json }}}}"
                dest: "{{{{ out }}}}/{{{{ inventory_hostname }}}}/facts.json"
                mode: "0644"
        """
    )


def _render(tmp_path: Path, backend: str = "ring", *, inventory: Path | None = None) -> Path:
    """Render every template for `inventory` (default: the sample one, on `backend`)."""
    out = tmp_path / "out"
    if inventory is None:
        inventory = tmp_path / "hosts.yml"
        cluster = SAMPLE_INVENTORY["all"]["children"]["mlx_cluster"]
        sample = {**cluster, "vars": {**cluster["vars"], "mlxnode_backend": backend,
                                      "mlxnode_venv_dir": "/opt/mlxnode/venv"}}  # fmt: skip
        inventory.write_text(yaml.safe_dump({"mlx_cluster": sample}))
    playbook = tmp_path / "render.yml"
    playbook.write_text(_render_playbook(out))
    render_playbook(inventory, playbook, tmp_path)
    return out


def render_playbook(inventory: Path, playbook: Path, tmp_path: Path, *extra: str) -> None:
    """Run a local rendering playbook with this repo's Ansible settings; it must succeed."""
    proc = subprocess.run(
        [_tool("ansible-playbook"), "-i", str(inventory), str(playbook), *extra],
        cwd=ROOT,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        text=True,
        env=_ansible_env(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    return _render(tmp_path_factory.mktemp("render"))


def test_config_yaml_loads_with_mlxnodes_config_loader(rendered):
    from mlxnode.config import load_config

    for host, rank in (("studio", 0), ("pro", 1), ("mini", 2)):
        path = rendered / host / "config.yaml"
        assert f"rank {rank} of 3" in path.read_text()
        resolved = load_config(config_path=path, environ={})
        cfg = resolved.config
        assert cfg.model.name == "mlx-community/Example-3B-4bit"
        assert cfg.model.path is None
        assert cfg.generation.max_tokens == 64
        assert cfg.generation.temperature == 0.0
        assert cfg.cache.dir == "/srv/models"
        assert cfg.cache.offline is True
        assert cfg.distributed.strategy == "pipeline"
        assert cfg.distributed.backend == "ring"
        # No split given: the hosts' memory weights, in rank order.
        assert cfg.distributed.split is None
        assert cfg.distributed.weights == [192.0, 96.0, 64.0]
        assert resolved.sources["model.name"] == str(path)


# Settings the roles deliberately set apart from mlxnode's defaults, and why.
CLUSTER_CHOICES = {
    "model.name": "org/only-the-model",  # the one variable the inventory below sets
    "cache.offline": True,  # a run uses only what the prewarm cached, never waits on the Hub
}


def test_role_defaults_are_mlxnodes_own_defaults(tmp_path):
    """One source of truth: what the roles render when the inventory sets nothing."""
    from mlxnode.config import Config, load_config

    inventory = _solo_inventory(tmp_path, mlxnode_model=CLUSTER_CHOICES["model.name"])
    out = _render(tmp_path, inventory=inventory) / "solo"

    def flat(config: Config) -> dict:
        return {
            f"{section}.{key}": value
            for section, values in dataclasses.asdict(config).items()
            for key, value in values.items()
        }

    defaults = flat(Config())
    rendered = flat(load_config(config_path=out / "config.yaml", environ={}).config)
    drift = {
        key: (value, defaults[key])
        for key, value in rendered.items()
        if value != CLUSTER_CHOICES.get(key, defaults[key])
    }
    assert drift == {}, f"role defaults that differ from mlxnode/config.py (role, python): {drift}"
    # The other roles' defaults that mirror one of mlxnode's, with no inventory variable set.
    from mlxnode import launcher, preflight

    others = {
        ("mlxnode_cache", "mlxnode_cache_dir"): defaults["cache.dir"],
        ("mlxnode_cache", "mlxnode_cache_revision"): defaults["model.revision"],
        ("mlxnode_run", "mlxnode_run_backend"): defaults["distributed.backend"],
        ("mlxnode_run", "mlxnode_run_connect_timeout"): preflight.DEFAULT_CONNECT_TIMEOUT,
        ("mlxnode_run", "mlxnode_run_timeout"): launcher.DEFAULT_TIMEOUT,
    }
    drift = {
        var: (role_value, value)
        for (role, var), value in others.items()
        if (role_value := yaml.safe_load(_role_default(role, var))) != value
    }
    assert drift == {}, f"role defaults that differ from mlxnode's (role, python): {drift}"


def _role_default(role: str, name: str) -> str:
    """A role default as Jinja renders it when the inventory sets nothing it falls back on."""
    import jinja2

    raw = yaml.safe_load((ROOT / "roles" / role / "defaults" / "main.yml").read_text())[name]
    return jinja2.Environment().from_string(str(raw)).render()


def test_hostfile_is_what_mlx_launch_parses(rendered):
    from mlx._distributed_utils.common import Hostfile

    from mlxnode.preflight import load_hostfile

    assert not (rendered / "pro" / "hosts.json").exists(), "only the launcher gets a hostfile"
    path = rendered / "studio" / "hosts.json"
    data = json.loads(path.read_text())
    assert data == [
        {"ssh": "192.0.2.11", "ips": ["10.10.0.1"], "name": "studio"},
        {"ssh": "192.0.2.12", "ips": ["192.0.2.12"], "name": "pro"},  # no mlxnode_mlx_ip
        {"ssh": "192.0.2.13", "ips": ["10.10.0.3"], "name": "mini"},
    ]
    # The names are what `mlxnode launch` calls the hosts in its messages.
    assert [h.name for h in load_hostfile(path)] == ["studio", "pro", "mini"]
    hostfile = Hostfile.from_file(path)
    assert [h.rank for h in hostfile.hosts] == [0, 1, 2]
    assert [h.ssh_hostname for h in hostfile.hosts] == ["192.0.2.11", "192.0.2.12", "192.0.2.13"]


def test_jaccl_hostfile_has_the_rdma_matrix(tmp_path):
    from mlx._distributed_utils.common import Hostfile

    out = _render(tmp_path, backend="jaccl")
    hostfile = Hostfile.from_file(out / "studio" / "hosts.json")
    assert [h.rdma for h in hostfile.hosts] == [
        [None, "rdma_en2", "rdma_en3"],
        ["rdma_en2", None, "rdma_en4"],
        ["rdma_en3", "rdma_en4", None],
    ]
    cfg = yaml.safe_load((out / "pro" / "config.yaml").read_text())
    assert cfg["distributed"]["backend"] == "jaccl"


def test_launch_daemon_plist_sets_the_wired_limit(rendered):
    for host in ("studio", "mini"):
        memtotal = json.loads((rendered / host / "facts.json").read_text())["memtotal_mb"]
        with (rendered / host / "wired-limit.plist").open("rb") as f:
            plist = plistlib.load(f)
        expected = memtotal - max(8192, int(memtotal * 0.15))
        assert plist["Label"] == "com.mlxnode.wired-limit"
        assert plist["RunAtLoad"] is True
        assert plist["ProgramArguments"] == [
            "/usr/sbin/sysctl",
            f"iogpu.wired_limit_mb={expected}",
        ]


def test_the_launch_daemon_is_reloaded_by_its_label_and_file():
    """macOS only, so never run here: the handler names the daemon the template installs."""
    (handler,) = yaml.safe_load((ROOT / "roles/mlxnode_host/handlers/main.yml").read_text())
    launchd = handler["community.general.launchd"]
    assert (launchd["name"], launchd["state"]) == (
        "{{ mlxnode_host_wired_limit_label }}",
        "reloaded",
    )
    assert launchd["plist"] == "{{ mlxnode_host_wired_limit_plist | basename }}"
    defaults = yaml.safe_load((ROOT / "roles/mlxnode_host/defaults/main.yml").read_text())
    # launchd looks the plist up by file name in /Library/LaunchDaemons.
    assert defaults["mlxnode_host_wired_limit_plist"] == (
        "/Library/LaunchDaemons/{{ mlxnode_host_wired_limit_label }}.plist"
    )


# --------------------------------------------------------------------------- filters


def _hv(**ranks):
    return {h: ({"mlxnode_rank": r} if r is not None else {}) for h, r in ranks.items()}


def test_rank_order_is_inventory_order_without_ranks():
    assert filters.rank_order(["a", "b", "c"], _hv(a=None, b=None, c=None)) == ["a", "b", "c"]


def test_rank_order_follows_explicit_ranks():
    assert filters.rank_order(["a", "b", "c"], _hv(a=2, b=0, c=1)) == ["b", "c", "a"]
    assert filters.rank_order(["a", "b"], _hv(a="1", b="0")) == ["b", "a"]


@pytest.mark.parametrize(
    ("hostvars", "message"),
    [
        (_hv(a=0, b=0, c=1), "rank 0 is claimed by a, b"),
        (_hv(a=0, b=2, c=3), "no host has rank 1"),
        (_hv(a=0, b=1, c=None), "not on c"),
        (_hv(a=0, b="x", c=1), "is not an integer"),
        (_hv(a=0, b=1, c=5), "outside 0..2"),
    ],
)
def test_rank_order_rejects_bad_ranks_clearly(hostvars, message):
    with pytest.raises(filters.AnsibleFilterError, match=message):
        filters.rank_order(["a", "b", "c"], hostvars)


def test_bad_ranks_fail_the_play_with_the_message(tmp_path):
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        yaml.safe_dump(
            {
                "mlx_cluster": {
                    "hosts": {"a": {"mlxnode_rank": 0}, "b": {"mlxnode_rank": 0}},
                    "vars": {
                        "ansible_connection": "local",
                        "ansible_python_interpreter": sys.executable,
                    },
                }
            }
        )
    )
    proc = subprocess.run(
        [
            _tool("ansible-playbook"),
            "-i",
            str(inventory),
            str(ROOT / "playbooks" / "configure.yml"),
            "-e",
            "mlxnode_model=org/name",
        ],
        cwd=ROOT,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        text=True,
        env=_ansible_env(tmp_path),
    )
    assert proc.returncode != 0
    assert "rank 0 is claimed by a, b" in proc.stdout + proc.stderr


RUN_IDS = ["20260101T000000Z-1a2b", "e2e-greedy", "a", "A.b_c-9", "x" * 128, "x" * 129,
           "../..", "..", ".hidden", "-x", "a/b", "a b", "a;rm", "", "ü", "a\tb",
           "$(id)", "abc\n"]  # fmt: skip


def test_run_ids_are_checked_by_the_launchers_rule():
    from mlxnode.errors import UsageError
    from mlxnode.launcher import check_run_id

    for candidate in RUN_IDS:
        try:
            check_run_id(candidate)
            launcher_accepts = True
        except UsageError:
            launcher_accepts = False
        try:
            filters.run_id(candidate)
            filter_accepts = True
        except filters.AnsibleFilterError as e:
            filter_accepts = False
            assert repr(candidate) in str(e)
        assert filter_accepts == launcher_accepts, candidate


@pytest.mark.parametrize("playbook", ["collect_logs.yml", "run.yml"])
def test_a_bad_run_id_is_refused_before_any_path_uses_it(tmp_path, playbook):
    home = tmp_path / "home"
    (home / ".mlxnode" / "runs").mkdir(parents=True)
    (home / "notes.json").write_text("{}")  # what ../.. would reach from the runs directory
    logs = tmp_path / "ctl" / "logs"
    inventory = _solo_inventory(
        tmp_path, mlxnode_venv_dir=str(home / ".mlxnode" / "venv"), mlxnode_run_logs_dir=str(logs)
    )
    proc = subprocess.run(
        [_tool("ansible-playbook"), "-i", str(inventory), str(ROOT / "playbooks" / playbook),
         "-e", json.dumps({"run_id": "../..", "prompt": "hi"})],
        cwd=ROOT, capture_output=True, text=True, env=_ansible_env(tmp_path),
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-4000:]
    # The run role's own check quotes the id as JSON, the filter as Python.
    assert re.search(r"""run id ["']\.\./\.\.["']: use letters, digits""", output), output[-4000:]
    assert not (tmp_path / "ctl").exists() and not (tmp_path / "solo").exists()
    assert sorted(p.name for p in home.iterdir()) == [".mlxnode", "notes.json"]


def test_memory_weights_all_or_nothing():
    hv = {"a": {"mlxnode_memory_weight": 64}, "b": {"mlxnode_memory_weight": "32"}}
    assert filters.memory_weights(["a", "b"], hv) == [64.0, 32.0]
    assert filters.memory_weights(["a", "b"], {"a": {}, "b": {}}) == []
    with pytest.raises(filters.AnsibleFilterError, match="not on b"):
        filters.memory_weights(["a", "b"], {"a": {"mlxnode_memory_weight": 1}, "b": {}})


def test_layout_keeps_split_over_weights_and_checks_each_entry():
    assert filters.layout([4, 2, 2], [1, 1, 1], 3) == {"split": [4, 2, 2], "weights": None}
    assert filters.layout([], [192, "64.5"], 2) == {"split": None, "weights": [192.0, 64.5]}
    assert filters.layout([], [], 2) == {"split": None, "weights": None}
    for split, message in (([2, 1, 1], "3 entries for 2 hosts"), ([4, 0], "positive int")):
        with pytest.raises(filters.AnsibleFilterError, match=message):
            filters.layout(split, [], 2)


def test_layout_args_say_exactly_what_the_config_says():
    weights = [34358465949.0, 34358546518.0, 34357273877.0, 0.1 + 0.2]
    args = filters.layout_args({"strategy": "pipeline", "split": None, "weights": weights})
    assert args[:3] == ["--strategy", "pipeline", "--weights"]
    # Every weight parses back to the same float: a rounded one can move a layer.
    assert [float(w) for w in args[3].split(",")] == weights
    assert filters.layout_args({"strategy": "pipeline", "split": [4, 2, 2], "weights": None}) == [
        "--strategy",
        "pipeline",
        "--split",
        "4,2,2",
    ]
    assert filters.layout_args({"strategy": "tensor"}) == ["--strategy", "tensor"]


def test_rsync_reaches_hosts_the_way_ansible_does():
    hv = {
        "ansible_host": "10.0.0.5",
        "ansible_user": "mlx",
        "ansible_port": 2222,
        "ansible_ssh_private_key_file": "/k/id",
        "ansible_ssh_common_args": (
            "-o UserKnownHostsFile=/k/known_hosts -o StrictHostKeyChecking=yes"
        ),
    }
    assert filters.rsync_ssh(hv) == (
        "ssh -o BatchMode=yes -p 2222 -i /k/id -o UserKnownHostsFile=/k/known_hosts "
        "-o StrictHostKeyChecking=yes"
    )
    assert filters.rsync_target(hv, "h", "/data/") == "mlx@10.0.0.5:/data/"
    assert filters.rsync_target({}, "h", "/d/") == "h:/d/"
    assert filters.known_hosts_file(hv) == "/k/known_hosts"
    assert filters.known_hosts_file({}) == "~/.ssh/known_hosts"


def _healthy(host, rank, **over):
    rec = {
        "host": host,
        "rank": rank,
        "reachable": True,
        "venv_ok": True,
        "versions": {"python": "/v/bin/python", "mlx": "0.32.4", "mlxnode": "0.1.0"},
        "need": {"needed": [{"file": "a", "size": 1000}], "missing_bytes": 0},
        "verify": {"ok": True, "missing": [], "corrupt": {}},
        "mem_free_mb": 1000,
        "disk_free_kb": 10_000_000,
    }
    rec.update(over)
    return rec


def test_health_flags_each_kind_of_problem():
    records = [
        _healthy("a", 0),
        _healthy("b", 1, verify={"ok": False, "missing": ["m-2.safetensors"], "corrupt": {}}),
        _healthy("c", 2, versions={"python": "/v/bin/python", "mlx": "0.31.0", "mlxnode": "0.1.0"}),
        {},
        _healthy("e", 4, mem_free_mb=0),
    ]
    findings = dict(zip(["a", "b", "c", "d", "e"], records, strict=True))
    reports = readiness.reports_from_findings(findings)
    result = readiness.summary(reports, readiness.Limits(disk_margin=0))
    assert result["not_ready"] == ["b", "c", "d", "e"]
    problems = {row["host"]: row["problem"] for row in result["rows"]}
    assert problems["a"] == ""
    assert "missing m-2.safetensors" in problems["b"]
    assert "versions differ" in problems["c"]
    assert problems["d"] == "unreachable"
    assert "free memory" in problems["e"]
    assert result["lines"][0].split()[:3] == ["host", "rank", "ready"]


def test_health_all_ready():
    findings = {"a": _healthy("a", 0), "b": _healthy("b", 1)}
    result = readiness.summary(readiness.reports_from_findings(findings))
    assert result["ready"] is True and result["not_ready"] == []


def test_health_cli_judges_the_findings_health_yml_hands_it():
    """What health.yml runs on the controller: findings on stdin, the verdict as JSON."""
    findings = {"a": _healthy("a", 0), "b": _healthy("b", 1, mem_free_mb=0), "c": {}}
    result = subprocess.run(
        [sys.executable, "-m", "mlxnode", "health", "--reports", "-", "--json", "--no-config"],
        input=json.dumps(findings), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 6, result.stderr
    verdict = json.loads(result.stdout)
    assert verdict["ready"] is False and verdict["not_ready"] == ["b", "c"]
    assert verdict["lines"][0].split()[:3] == ["host", "rank", "ready"]
    assert result.stderr.startswith("mlxnode: error: not ready: rank 1 on b: free memory")
    assert "rank 2 on c: unreachable" in result.stderr


def test_health_and_the_launchers_preflight_apply_one_rule():
    skewed = readiness.HostReport(1, "b", True, python="/v/bin/python", mlx="0.31.0", mlxnode="0.1")
    usual = readiness.HostReport(0, "a", True, python="/v/bin/python", mlx="0.32.4", mlxnode="0.1")
    findings = {
        r.host: _healthy(r.host, r.rank, versions=dataclasses.asdict(r)) for r in (usual, skewed)
    }
    from_ansible = readiness.summary(readiness.reports_from_findings(findings))
    assert from_ansible["problems"] == readiness.problems([usual, skewed])
    assert from_ansible["problems"] == [
        "mlx differs between hosts: 0.31.0 on b vs 0.32.4 on a; run playbooks/provision.yml "
        "so every host has the same"
    ]


def test_table_aligns_columns():
    lines = filters.format_table([{"a": "x", "b": 10}, {"a": "long", "b": None}], ["a", "b"])
    assert lines == ["a     b", "----  --", "x     10", "long"]


# --------------------------------------------------------------------------- wheelhouse


def _wheelhouse_module():
    path = ROOT / "roles" / "mlxnode_host" / "files" / "build_wheelhouse.py"
    spec = importlib.util.spec_from_file_location("build_wheelhouse", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wheelhouse_key_depends_only_on_what_decides_the_wheels():
    wh = _wheelhouse_module()
    base = wh.deps_key(b"deps", "mlxnode[cpu]", [], "3.11", ["b", "a"])
    assert base == wh.deps_key(b"deps", "mlxnode[cpu]", [], "3.11", ["a", "b", "a"])
    assert base != wh.deps_key(b"deps2", "mlxnode[cpu]", [], "3.11", ["a", "b"])
    assert base != wh.deps_key(b"deps", "mlxnode[cuda]", [], "3.11", ["a", "b"])
    assert base != wh.deps_key(b"deps", "mlxnode[cpu]", [], "3.12", ["a", "b"])


def test_macos_wheelhouse_keeps_darwin_only_dependencies():
    wh = _wheelhouse_module()
    darwin = {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"}
    added = wh.marker_only_deps(ROOT, "mlxnode", darwin)
    assert any(spec.startswith("mlx==") or spec.startswith("mlx<") for spec in added), added
    assert wh.marker_only_deps(ROOT, "mlxnode[cpu]", {"sys_platform": "linux"}) == []


def test_roles_and_playbooks_call_the_collections_filters_by_their_full_names():
    """A bare `| mlxnode_rank_order(...)` fails at run time ('No filter named ...'), and
    only where the task runs: syntax checks pass it."""
    from importlib import import_module

    sys.path.insert(0, str(ROOT / "plugins" / "filter"))
    try:
        names = set(import_module("mlxnode_cluster").FilterModule().filters())
    finally:
        sys.path.remove(str(ROOT / "plugins" / "filter"))
    bare = re.compile(r"\|\s*(" + "|".join(map(re.escape, sorted(names))) + r")\b")
    found = [
        f"{path.relative_to(ROOT)}: {m.group(1)}"
        for folder in ("roles", "playbooks")
        for path in sorted((ROOT / folder).rglob("*.yml"))
        if "collections" not in path.parts
        for m in bare.finditer(path.read_text())
    ]
    assert found == [], "call these as mlxnode.cluster.<name>: " + ", ".join(found)
