"""Placeholder: filled in by its profile."""
__all__: list = []
