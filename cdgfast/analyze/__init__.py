"""`python -m cdgfast.analyze`: an alias of `python -m cdgfast.analysis` (the Fisher-geometry command
line lives in cdgfast/analysis/cli.py), kept so that existing commands keep working."""
from cdgfast.analysis import cli as _cli

PROG = "python -m cdgfast.analyze"


def build_parser():
    """`cdgfast.analysis.cli.build_parser` under this command's name."""
    return _cli.build_parser(PROG)


def main(argv=None) -> int:
    """`cdgfast.analysis.cli.main` under this command's name."""
    return _cli.main(argv, prog=PROG)


__all__ = ["build_parser", "main"]
