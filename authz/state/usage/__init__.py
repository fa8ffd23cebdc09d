"""Usage records on their way to durable storage: the append-only JSONL file
(``records.py``) and the Redis stream with its on-disk spool (``redis_sink.py``).
May import ``policy`` and ``state.keys.redis_store``'s connection helper.
"""
