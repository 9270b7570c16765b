"""mlxnode: sharded LLM inference with MLX across a cluster of hosts."""

__version__ = "0.1.0"
