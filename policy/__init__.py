"""tokenbooth's pure core: config, keys, limits, routing, OpenAI parsing, usage.

Nothing here imports grpc, redis or Envoy protobuf (a test checks); the clock
and randomness are passed in.
"""
