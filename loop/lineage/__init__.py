"""lineage plane."""
