"""Training engines: one iteration of the paper for every client (simulation.py) and the round
loop with run directory, checkpoints, metrics and samples around it (trainer.py)."""
