"""Studies and their pages: staged experiment plans (`experiment`) and the self-contained HTML report
(`report`). Sits above training (a stage is a training run) and the flows."""
