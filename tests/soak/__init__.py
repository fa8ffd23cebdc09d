"""The soak and chaos suite (issue 18 part 3): `python -m tests.soak --help`, `make soak`.

Two `tokenbooth serve` replicas, one Envoy, one redis-server and the simulator, started
on free ports in a temporary directory; concurrent openai SDK clients; Redis, a replica
and the upstream killed and restarted on a schedule; a report of what the clients saw
against what was recorded and charged. tests/e2e/test_soak_short.py runs a short form.
"""
