"""tokenbooth's adapters and processes: Envoy servicers, server, stores, CLI, simulator."""
