"""merge plane."""
