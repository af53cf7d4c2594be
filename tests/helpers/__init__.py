"""Helpers shared by test modules (tests/ is on sys.path through pythonpath in pyproject.toml, so they import
as `helpers.<module>`). Test modules import from here, never from one another."""
