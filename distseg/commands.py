"""CLI commands that need torch (train, evaluate, predict, bench); imported lazily by distseg.cli."""
