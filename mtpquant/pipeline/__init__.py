"""`plan` and `build`: every check first, then the steps, each skipped when its inputs are unchanged."""
