"""Recipes: YAML files validated in full before any long step, into frozen dataclasses."""
