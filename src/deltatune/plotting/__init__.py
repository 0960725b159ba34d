"""Plots of what a delta learned (PNG files, drawn with matplotlib's Agg backend)."""
