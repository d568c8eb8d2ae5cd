"""sp2dpo: Semantic Per-Pair DPO on Ray."""
__version__ = "0.1.0"
