"""Measurements of generators: the cheap in-training label probe (quick.py)."""
