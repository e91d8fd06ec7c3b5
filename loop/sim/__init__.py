"""sim plane."""
