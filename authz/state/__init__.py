"""State that outlives a request: API keys (``keys/``: keyring file, Redis, HTTP
validation service), limits and budgets (``limits/``: memory and Redis stores applying
``policy.admission``'s transitions, and the outage policy in ``limits/admission.py``),
usage records (``usage/``: file sink, Redis stream with a disk spool) and the lean
Redis client (``resp.py``). Lua scripts live beside the store that runs them. May
import ``policy`` only.
"""
