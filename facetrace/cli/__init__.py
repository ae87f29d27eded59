"""The `facetrace` command line: each verb runs a flow or reads the catalog (see :mod:`.app`)."""

from facetrace.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
