"""lowrank-train: memory-efficient LLM pretraining with pluggable weight parameterizations and
gradient projectors, in one trainer loop."""

__version__ = "0.1.0"
