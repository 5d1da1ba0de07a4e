"""Clients nobody here wrote, run against the real stack: tritonclient, in .venv-tritonclient (venv.py)."""
