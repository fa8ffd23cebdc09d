"""tokenbooth's adapters and processes, grouped by role.

- ``services/``: the ext_authz and ext_proc gRPC servicers and the per-request lifecycle.
- ``envoy_config/``: rendering Envoy's bootstrap from the policy.
- ``state/``: keys, limits and usage records, in memory or in Redis.
- ``runtime/``: the server process, config snapshots and reload, settings, telemetry.
- ``cli/``: the ``tokenbooth`` command.
- ``sim/``: the built-in vLLM-compatible upstream simulator.

Every decision is made in ``policy/``; these packages translate and store.
Imports flow one way: cli → runtime → services → state / envoy_config → policy.
"""
