"""models plane."""
