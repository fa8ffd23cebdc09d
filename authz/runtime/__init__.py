"""The processes: the grpc.aio server with its HTTP side port (``server.py``,
``side_port.py``), the config snapshot and its hot reload (``snapshot.py``,
``overrides.py``), process settings read once from the environment (``settings.py``),
telemetry (``metrics.py``, ``logs.py``, ``tracing.py``), the usage recorder
(``recorder.py``), terminal table cells (``cells.py``), and ``tokenbooth up``'s
supervisor (``supervisor.py``, ``procs.py``, ``defaults.py``). May import everything
below ``cli``.
"""
