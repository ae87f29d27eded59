"""The `facetrace` command line: each verb runs a flow or reads the catalog (see :mod:`.main`)."""

from facetrace.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
