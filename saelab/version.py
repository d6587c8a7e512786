"""The one place saelab's version lives: the package, its records and pyproject.toml all read it from here.

A module of its own (not saelab/__init__.py) so that any saelab module can stamp its records with the version
without importing the package's public face back, which would be an import cycle.
"""

__version__ = "0.1.0"
