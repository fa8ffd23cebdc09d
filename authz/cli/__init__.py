"""The ``tokenbooth`` command: argument parsing and dispatch (``main.py``), one module
per command group (``keys.py``, …). The only place that reads the process environment
into ``runtime.settings.Settings``. May import every other package.
"""
