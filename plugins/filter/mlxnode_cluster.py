"""Filters every mlxnode role shares: rank order, hostfile entries, ssh options, tables.

Kept in one plugin so the roles cannot disagree on which host is rank 0 or how
the mlx.launch hostfile looks. Pure functions of the inventory, so the tests
import this module directly.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# One byte format and one table layout for mlxnode and its playbooks. The controller runs
# ansible-playbook from the virtualenv that holds mlxnode (`make setup`), as fanout mode's
# prewarm and health.yml's verdict need anyway.
from mlxnode.formatting import format_bytes, format_table

try:
    from ansible.errors import AnsibleFilterError
except ImportError:  # imported by the tests without Ansible on the path

    class AnsibleFilterError(Exception):  # type: ignore[no-redef]
        pass


# The launcher's rule for run ids (mlxnode/launcher.py): a run id names a directory on every
# host and is part of a process pattern. tests/test_ansible.py checks both accept the same ids.
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RANK_VAR = "mlxnode_rank"
MLX_IP_VAR = "mlxnode_mlx_ip"
WEIGHT_VAR = "mlxnode_memory_weight"
RDMA_VAR = "mlxnode_rdma_devices"


def rank_order(hosts: Sequence[str], hostvars: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Hosts in rank order: inventory order, unless every host sets `mlxnode_rank`.

    Raises:
        AnsibleFilterError: some hosts set a rank and others not, a rank is not an
            integer, two hosts share a rank, or the ranks leave a gap.
    """
    hosts = list(hosts)
    if not hosts:
        raise AnsibleFilterError(
            "the cluster group has no hosts; list them under mlx_cluster in the inventory"
        )
    explicit = {h: hostvars.get(h, {}).get(RANK_VAR) for h in hosts}
    explicit = {h: r for h, r in explicit.items() if r is not None and r != ""}
    if not explicit:
        return hosts
    missing = [h for h in hosts if h not in explicit]
    if missing:
        raise AnsibleFilterError(
            f"{RANK_VAR} is set on {', '.join(sorted(explicit))} but not on "
            f"{', '.join(missing)}; set it on every host of the cluster or on none "
            "(then rank order is inventory order)"
        )
    ranks: dict[str, int] = {}
    for host, raw in explicit.items():
        try:
            ranks[host] = int(str(raw))
        except ValueError:
            raise AnsibleFilterError(
                f"{host}: {RANK_VAR}={raw!r} is not an integer; use 0..{len(hosts) - 1}"
            ) from None
    by_rank: dict[int, list[str]] = {}
    for host, rank in ranks.items():
        by_rank.setdefault(rank, []).append(host)
    problems = []
    for rank, owners in sorted(by_rank.items()):
        if len(owners) > 1:
            problems.append(f"rank {rank} is claimed by {', '.join(owners)}")
    expected = set(range(len(hosts)))
    gaps = sorted(expected - set(by_rank))
    extra = sorted(set(by_rank) - expected)
    if gaps:
        problems.append(f"no host has rank {', '.join(map(str, gaps))}")
    if extra:
        problems.append(
            f"rank {', '.join(map(str, extra))} is outside 0..{len(hosts) - 1} "
            f"for {len(hosts)} hosts"
        )
    if problems:
        listing = ", ".join(f"{h}={r}" for h, r in sorted(ranks.items(), key=lambda kv: kv[1]))
        raise AnsibleFilterError(
            f"invalid {RANK_VAR} values ({listing}): {'; '.join(problems)}. "
            f"Ranks must be 0..{len(hosts) - 1}, each used once"
        )
    return [by_rank[r][0] for r in range(len(hosts))]


def run_id(value: Any) -> str:
    """`value` if it is a usable run id (checked before it is used in any path).

    Raises:
        AnsibleFilterError: it holds anything but letters, digits, '.', '_' and '-'.
    """
    text = str(value)
    if not RUN_ID.fullmatch(text):
        raise AnsibleFilterError(
            f"run id {text!r}: use letters, digits, '.', '_' and '-' (at most 128), "
            "starting with a letter or digit"
        )
    return text


def host_rank(host: str, hosts: Sequence[str], hostvars: Mapping[str, Mapping[str, Any]]) -> int:
    """The rank of `host` in the cluster."""
    order = rank_order(hosts, hostvars)
    if host not in order:
        raise AnsibleFilterError(f"{host} is not in the cluster group ({', '.join(order)})")
    return order.index(host)


def ssh_name(host: str, hostvars: Mapping[str, Mapping[str, Any]]) -> str:
    """The address the launcher uses to ssh to `host` (its ansible_host)."""
    hv = hostvars.get(host, {})
    return str(hv.get("ansible_host") or host)


def mlx_ip(host: str, hostvars: Mapping[str, Mapping[str, Any]]) -> str:
    """The address MLX traffic uses: `mlxnode_mlx_ip` (Thunderbolt), else ansible_host."""
    hv = hostvars.get(host, {})
    return str(hv.get(MLX_IP_VAR) or ssh_name(host, hostvars))


def hostfile(
    order: Sequence[str], hostvars: Mapping[str, Mapping[str, Any]], backend: str = "ring"
) -> list[dict[str, Any]]:
    """mlx.launch hostfile entries, in rank order.

    ring: ``{"ssh": ..., "ips": [...], "name": ...}``; `name` is the inventory name, which
    mlx.launch ignores and `mlxnode launch` uses in its messages. jaccl adds ``rdma``: for
    rank i, the RDMA device that reaches rank j (None for itself), from each host's
    `mlxnode_rdma_devices` mapping of peer inventory name to device.
    """
    _refuse_shared_addresses(order, "ansible_host", lambda h: ssh_name(h, hostvars))
    _refuse_shared_addresses(order, MLX_IP_VAR, lambda h: mlx_ip(h, hostvars))
    entries = []
    for i, host in enumerate(order):
        entry: dict[str, Any] = {
            "ssh": ssh_name(host, hostvars),
            "ips": [mlx_ip(host, hostvars)],
            "name": host,
        }
        if backend in ("jaccl", "jaccl-ring"):
            devices = hostvars.get(host, {}).get(RDMA_VAR) or {}
            row: list[Any] = []
            for j, peer in enumerate(order):
                if i == j:
                    row.append(None)
                    continue
                device = devices.get(peer)
                if not device:
                    raise AnsibleFilterError(
                        f"{host}: {RDMA_VAR} has no device for peer {peer}; jaccl needs "
                        "one RDMA device per peer (see `ibv_devices` on the host)"
                    )
                row.append(device)
            entry["rdma"] = row
        entries.append(entry)
    return entries


def _refuse_shared_addresses(order: Sequence[str], var: str, address: Any) -> None:
    """Two hosts on one address would get two ranks on one machine's ports: refuse it."""
    owners: dict[str, list[str]] = {}
    for host in order:
        owners.setdefault(address(host), []).append(host)
    shared = {a: hosts for a, hosts in owners.items() if len(hosts) > 1}
    if shared:
        listing = "; ".join(f"{a} is used by {', '.join(h)}" for a, h in shared.items())
        raise AnsibleFilterError(f"{var} must differ between hosts: {listing}")


def memory_weights(order: Sequence[str], hostvars: Mapping[str, Mapping[str, Any]]) -> list[float]:
    """`mlxnode_memory_weight` per rank, or [] when no host sets one."""
    values = [hostvars.get(h, {}).get(WEIGHT_VAR) for h in order]
    if all(v in (None, "") for v in values):
        return []
    missing = [h for h, v in zip(order, values, strict=True) if v in (None, "")]
    if missing:
        raise AnsibleFilterError(
            f"{WEIGHT_VAR} is set on some hosts but not on {', '.join(missing)}; "
            "set it on every host or on none"
        )
    try:
        weights = [float(v) for v in values]
    except (TypeError, ValueError):
        raise AnsibleFilterError(f"{WEIGHT_VAR} must be numbers, got {values}") from None
    if any(w <= 0 for w in weights):
        raise AnsibleFilterError(f"{WEIGHT_VAR} must be > 0 on every host, got {values}")
    return weights


def layout(
    split: Iterable[Any] | None, weights: Iterable[Any] | None, world_size: int
) -> dict[str, list[Any] | None]:
    """The ``split`` and ``weights`` a host's config.yaml gets: one of them, or neither.

    Computed once, in mlxnode_config, and only read back afterwards: the prewarm and the
    run both take them from the rendered file, so they cannot split the layers apart.

    Raises:
        AnsibleFilterError: an entry is not a positive number, or there is not one entry
            per host. The layer count is checked by mlxnode itself.
    """
    split = [_positive("mlxnode_split", s, int) for s in (split or [])]
    weights = [_positive("mlxnode_weights", w, float) for w in (weights or [])]
    for var, values in (("mlxnode_split", split), ("mlxnode_weights", weights)):
        if values and len(values) != int(world_size):
            raise AnsibleFilterError(
                f"{var} has {len(values)} entries for {world_size} hosts; give one per host"
            )
    return {"split": split or None, "weights": None if split else (weights or None)}


def _positive(var: str, value: Any, kind: type) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise AnsibleFilterError(f"{var}: {value!r} is not a number") from None
    if not number > 0 or (kind is int and str(value).strip() != str(number)):
        raise AnsibleFilterError(
            f"{var}: every entry must be a positive {kind.__name__}, got {value!r}"
        )
    return number


def layout_args(distributed: Mapping[str, Any]) -> list[str]:
    """The `--strategy/--split/--weights` flags that say what a host's config.yaml says.

    `distributed` is the ``distributed`` section of a config.yaml mlxnode already checked;
    a weight is written so it parses back to the very same float, so a command given these
    flags splits the layers exactly as a run reading the file does.
    """
    args = []
    if distributed.get("strategy"):
        args += ["--strategy", str(distributed["strategy"])]
    if distributed.get("split"):
        args += ["--split", ",".join(str(int(s)) for s in distributed["split"])]
    elif distributed.get("weights"):
        args += ["--weights", ",".join(_exact(float(w)) for w in distributed["weights"])]
    return args


def _exact(number: float) -> str:
    """The shortest text that parses back to `number` (`f"{w:g}"` keeps only 6 digits)."""
    return str(int(number)) if number.is_integer() else repr(number)


def rsync_ssh(hv: Mapping[str, Any]) -> str:
    """The `rsync -e` command that reaches a host the way Ansible does (same key, known_hosts)."""
    parts = ["ssh", "-o", "BatchMode=yes"]
    port = hv.get("ansible_port") or hv.get("ansible_ssh_port")
    if port:
        parts += ["-p", str(port)]
    key = hv.get("ansible_ssh_private_key_file") or hv.get("ansible_private_key_file")
    if key:
        parts += ["-i", str(key)]
    for name in ("ansible_ssh_common_args", "ansible_ssh_extra_args"):
        if hv.get(name):
            parts += shlex.split(str(hv[name]))
    return shlex.join(parts)


def rsync_target(hv: Mapping[str, Any], host: str, path: str) -> str:
    """``user@address:path`` for rsync, user only when the inventory sets one."""
    address = str(hv.get("ansible_host") or host)
    if ":" in address:  # IPv6
        address = f"[{address}]"
    user = hv.get("ansible_user") or hv.get("ansible_ssh_user")
    return f"{user}@{address}:{path}" if user else f"{address}:{path}"


def known_hosts_file(hv: Mapping[str, Any], default: str = "~/.ssh/known_hosts") -> str:
    """The known_hosts file the controller checks this host against."""
    for name in ("ansible_ssh_common_args", "ansible_ssh_extra_args"):
        words = shlex.split(str(hv.get(name) or ""))
        for i, word in enumerate(words):
            option = word
            if word == "-o" and i + 1 < len(words):
                option = words[i + 1]
            elif word.startswith("-o"):
                option = word[2:]
            key, _, value = option.partition("=")
            if key.strip().lower() == "userknownhostsfile" and value:
                return value.split()[0]
    return default


def item(seq: Sequence[Any], index: int, default: Any = None) -> Any:
    """seq[index], or `default` when it is out of range."""
    try:
        return seq[index]
    except (IndexError, TypeError):
        return default


class FilterModule:
    """mlxnode cluster filters."""

    def filters(self) -> dict[str, Any]:
        return {
            "mlxnode_rank_order": rank_order,
            "mlxnode_host_rank": host_rank,
            "mlxnode_run_id": run_id,
            "mlxnode_hostfile": hostfile,
            "mlxnode_memory_weights": memory_weights,
            "mlxnode_layout": layout,
            "mlxnode_layout_args": layout_args,
            "mlxnode_rsync_ssh": rsync_ssh,
            "mlxnode_rsync_target": rsync_target,
            "mlxnode_known_hosts_file": known_hosts_file,
            "mlxnode_table": format_table,
            "mlxnode_human_bytes": format_bytes,
            "mlxnode_item": item,
        }
