"""traces plane."""
