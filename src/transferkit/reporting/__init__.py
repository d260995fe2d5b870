"""The report, its figures, the one HTML style and the heat maps."""
