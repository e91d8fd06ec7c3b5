"""validate plane."""
