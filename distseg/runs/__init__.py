"""Run folders: their layout (`RunDir`), the checkpoints in them and the lease that gives a run one owner.

Imports only the leaves, `models` (a run's model) and nothing that trains or infers."""
