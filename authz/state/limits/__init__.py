"""Limit and budget state behind one protocol (``base.py``): the in-memory store
(``memory.py``) and the Redis store (``redis_limits.py``, Lua scripts inline), both
applying the transitions that ``policy.admission`` defines; ``admission.py`` adds the
outage policy (fail closed, or a local limiter that reconciles later). May import
``policy`` and ``state.resp``.
"""
