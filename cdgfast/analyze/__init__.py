"""`python -m cdgfast.analyze fisher ...`: the rank-1 paper's Fisher-geometry measurements (section 3.2)."""
from .cli import build_parser, main

__all__ = ["build_parser", "main"]
