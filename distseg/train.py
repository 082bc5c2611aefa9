"""The training entry as a file, so that `accelerate launch distseg/train.py -c configs/<name>.yaml
[key=value]` (or `python -m distseg.launch ... distseg/train.py ...`) starts one process per rank. It is
`distseg train`: the same options, messages and exit status (distseg/commands/train.py,
distseg/training/entry.py)."""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Python put this file's folder first on sys.path, where distseg's rooms would shadow top-level modules
    # of the same name (data, models, ...): the repository root takes its place, so `distseg` is importable
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from distseg.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
