"""out/stepN/metrics.json: each step's measured figures, gathered by run_all.py
into out/report.md. A run written elsewhere (--out) keeps its figures in its own folder."""
import json
import pathlib

from common.checkpoint import atomic_write_text
from common.paths import step_dir


def read_metrics(step: int) -> dict:
    path = step_dir(step) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_metrics(step: int, data: dict, section: str | None = None, folder=None) -> dict:
    """Merge `data` into out/stepN/metrics.json (under `section` if given), or into FOLDER/metrics.json
    when the run writes elsewhere (a script's --out), so the step's own figures stay its default run's.
    Returns the whole file."""
    path = pathlib.Path(folder or step_dir(step)) / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    if section is None:
        metrics.update(data)
    else:
        metrics.setdefault(section, {}).update(data)
    atomic_write_text(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics
