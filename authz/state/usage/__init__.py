"""Usage records on their way to durable storage: the append-only JSONL file, rotated by
size (``records.py``), the Redis stream with its on-disk spool (``redis_sink.py``) kept
bounded (``trim.py``), and PostgreSQL as the ledger of record (``archive.py``, filled by
``exporter.py``, read by ``query.py``, ``page.py`` and ``reading.py``).
May import ``policy`` and ``state.keys.redis_store``'s connection helper.
"""
