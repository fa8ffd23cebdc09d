"""The gRPC servicers Envoy calls: ext_authz (``ext_authz.py``) and ext_proc
(``ext_proc.py`` driving one ``Exchange`` per request), the Envoy protobuf helpers
(``protos.py``), the principal's metadata codec (``principal_md.py``) and the key check
(``keyauth.py``). This is the one place that turns a domain error (``policy.errors.ApiError``)
into an Envoy denial or an ImmediateResponse. May import ``policy``, ``state``,
``envoy_config.names`` and the leaf modules of ``runtime`` (snapshot, metrics, tracing,
recorder); never ``runtime.server`` or ``cli``.
"""
