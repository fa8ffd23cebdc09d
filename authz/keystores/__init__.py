"""Where API keys live: the embedded keyring file, Redis, or an HTTP validation service."""
