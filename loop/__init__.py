"""continual-loop: serve a student, trace every request, distill from a teacher, merge, validate,
deploy, and track the lineage of every checkpoint, on one Ray cluster.

Importing `loop` starts nothing and needs neither vLLM nor a GPU.
"""
from loop.config import LoopConfig, hash_api_key, load_config

__version__ = "0.1.0"
__all__ = ["LoopConfig", "load_config", "hash_api_key", "__version__"]
