"""Limit and budget state: the in-memory store and the Redis store, one protocol."""
