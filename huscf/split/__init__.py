"""U-shaped split of block networks: where each block runs (plan), the client and server modules
built from it (segments), and the one seam tensors cross between them (seam)."""
