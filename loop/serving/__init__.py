"""serving plane."""
