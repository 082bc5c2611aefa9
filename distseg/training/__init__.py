"""The training loop as named steps (`loop.py`), how a run starts and resumes (`setup.py`, `resume.py`), how
it is asked to stop (`stopping.py`), what it logs (`step_log.py`, `tensorboard.py`) and its entry
(`entry.py`).

Imports every room below it: leaves, data, models, inference, runs."""
