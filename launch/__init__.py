"""Launching training runs: SLURM jobs (launch.slurm) and config sweeps (launch.sweep)."""
