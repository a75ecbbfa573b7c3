"""Errors raised at the boundary (files, configs, command line).

A `MedsynError` carries a message written for the user: it names the file, key or value
and says what was expected. The command-line entry points print it without a traceback.
"""

from __future__ import annotations


class MedsynError(Exception):
    """An error caused by user input, reported without a traceback by the CLI."""


class ConfigError(MedsynError, ValueError):
    """A configuration key or value is invalid."""


class DataError(MedsynError):
    """An input file (volume, mask, report, manifest) is missing or malformed."""
