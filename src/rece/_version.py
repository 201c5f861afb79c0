"""rece's version, in a module of its own: provenance reads it without importing the `rece` package, and
pyproject.toml reads it for the package metadata."""

__version__ = "0.1.0"
