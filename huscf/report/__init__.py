"""What a person looks at: sample grids (grids.py)."""
