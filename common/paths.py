"""Where things live. Every path is anchored at the repository root, so scripts
behave the same whether they are run from the root, from their own folder, or
as `python -m stepN_x.script`."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = REPO_ROOT / "out"  # generated artifacts; ignored by git


def step_dir(step: int) -> Path:
    """out/stepN/, created on first use."""
    path = OUT_DIR / f"step{step}"
    path.mkdir(parents=True, exist_ok=True)
    return path
