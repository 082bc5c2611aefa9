"""`distseg bench data|train|shard|eval`: throughput measurements printed as Markdown tables, one module per
verb. Speed is shown here (and recorded in docs/BENCHMARKS.md), never asserted in tests."""
