"""Built-in vLLM-compatible upstream simulator: OpenAI endpoints with deterministic
token counts, latency knobs, vLLM metric names and test hooks (``tokenbooth sim``)."""

from authz.sim.app import make_app, run_sim

__all__ = ["make_app", "run_sim"]
