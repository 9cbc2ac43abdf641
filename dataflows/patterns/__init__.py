"""Declarative complex-event patterns: their definitions (`definitions`) and, separately, the engine that runs them."""
