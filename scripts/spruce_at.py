"""Run the spruce CLI from another checkout (a `git worktree` of the commit being measured).

    SPRUCE_TREE=/tmp/bt .venv/bin/python scripts/spruce_at.py bench spec --modes none,ngram-4 ...

The venv's editable install maps `spruce` to the main checkout with a meta-path finder that comes
before sys.path, so PYTHONPATH alone still runs the main checkout's code (and a long run picks up
whatever is edited there while it lazily imports). This drops that finder first.
"""
import os
import sys

tree = os.path.abspath(os.environ["SPRUCE_TREE"])
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
sys.path.insert(0, tree)
import spruce  # noqa: E402

if not os.path.abspath(spruce.__file__).startswith(tree + os.sep):
    sys.exit(f"spruce_at: imported {spruce.__file__}, not from {tree}")
from spruce.cli import main  # noqa: E402

sys.argv[0] = "spruce"
sys.exit(main())
