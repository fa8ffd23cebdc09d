"""The ``tokenbooth`` command: argument parsing and dispatch (``main.py``), one module
per command group (``serve.py`` for ``up`` and ``serve``, ``sim.py``, ``envoy.py``,
``check.py``, ``keys.py``, ``usage.py``) and what they share (``common.py``). ``main``
is the only place that reads the process environment, into
``runtime.settings.Settings``, which it hands to every command. Command modules import
``common`` and never each other. May import every other package.
"""
