"""Where things live. Every path is anchored at the repository root, so scripts
behave the same whether they are run from the root, from their own folder, or
as `python -m stepN_x.script`.

A `--quick` run writes under out/quick/ instead of out/: its tiny models and
figures never overwrite what a full run trained (eight minutes of pretraining
are not lost to a ten-second smoke test), and a quick step reads what the
quick steps before it wrote."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = REPO_ROOT / "out"  # generated artifacts; ignored by git
QUICK_FOLDER = "quick"       # out/quick/: everything a --quick run writes


def use_quick_outputs() -> Path:
    """From now on this process reads and writes under out/quick/ (called by the --quick flag)."""
    global OUT_DIR
    if not quick_outputs():
        OUT_DIR = OUT_DIR / QUICK_FOLDER
    return OUT_DIR


def quick_outputs() -> bool:
    """Is this a --quick run (reading and writing out/quick/)?"""
    return OUT_DIR.name == QUICK_FOLDER


def step_dir(step: int) -> Path:
    """out/stepN/ (out/quick/stepN/ in a --quick run), created on first use."""
    path = OUT_DIR / f"step{step}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def own_data_dir(step: int, data) -> Path:
    """Where a run on the learner's own data writes when no --out is given: out/stepN/<data's name>/
    (out/step4/my_chats/ for --data my_chats.jsonl), so the tutorial's own model in out/stepN/ is never
    replaced by a run on other data."""
    return step_dir(step) / Path(data).stem
