"""teacher plane."""
