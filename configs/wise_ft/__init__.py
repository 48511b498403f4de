"""Recipes of WiSE-FT: shapes.py (CPU, minutes) and b16.py (ViT-B/16, the reference recipe)."""
