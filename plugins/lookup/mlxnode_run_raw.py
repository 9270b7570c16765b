"""Read a variable given with ``-e`` exactly as typed, never evaluated as a template.

Ansible evaluates ``{{ }}`` and ``{% %}`` inside extra vars wherever they are used, so a
prompt like ``{{ lookup('pipe', 'id') }}`` would run a command on the controller. This
lookup re-reads the ``-e`` arguments the way Ansible parses them and returns the first of
the given names that was set there, marked unsafe (data, not a template). Only when none
was given with ``-e`` does it return the first name's ordinary value (inventory or role
default), templated as usual.

A template that names such a variable evaluates it even in a branch it never takes
(Jinja resolves every name up front), so the role names these variables only here.

    query('mlxnode.cluster.mlxnode_run_raw', 'mlxnode_run_prompt', 'prompt')[0]  ->  '{{ 7*7 }}'

With ``flags``, a list of ``[role variable, -e name, flag]``, it returns one argv list
instead: ``--flag=VALUE`` for each setting given (``-e max_tokens=64`` ->
``--max-tokens=64``), in the list's order, skipping those left empty. One argument
each, so a value starting with ``-`` stays a value.

    query('mlxnode.cluster.mlxnode_run_raw', flags=[['mlxnode_run_seed', 'seed', '--seed']])[0]
        ->  ['--seed=7']
"""

from __future__ import annotations

from ansible.plugins.lookup import LookupBase
from ansible.utils.unsafe_proxy import wrap_var
from ansible.utils.vars import load_extra_vars

DOCUMENTATION = r"""
name: mlxnode_run_raw
short_description: a variable given with -e, untemplated
description:
  - Returns the first of the named variables that was given with -e, marked unsafe so
    that it is never evaluated as a template; else the first name's ordinary value.
options:
  _terms:
    description: Variable names, highest priority first.
    required: false
  flags:
    description: "[role variable, -e name, flag] triples; return them as one argv list."
    type: list
    required: false
"""


class LookupModule(LookupBase):
    def run(self, terms, variables=None, flags=None, **kwargs):
        given = load_extra_vars(self._loader)
        if flags is None:
            return [self._value(given, terms, variables)]
        argv = []
        for role_var, name, flag in flags:
            value = self._value(given, [role_var, name], variables)
            if value is not None and str(value) != "":
                argv.append(wrap_var(f"{flag}={value}"))
        return [argv]

    def _value(self, given, names, variables):
        for name in names:
            if name in given:
                return wrap_var(given[name])
        # Not from -e: the inventory's or the role default's value, which may use templates.
        value = (variables or {}).get(names[0]) if names else None
        return self._templar.template(value) if value is not None else None
