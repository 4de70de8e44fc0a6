"""Integrations with other training stacks (optional dependencies)."""
