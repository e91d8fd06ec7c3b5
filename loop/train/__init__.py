"""train plane."""
