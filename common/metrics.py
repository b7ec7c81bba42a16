"""out/stepN/metrics.json: each step's measured figures, gathered by run_all.py
into out/report.md. A run written elsewhere (--out) keeps its figures in its own folder."""
import json
import pathlib

from common.checkpoint import atomic_write_text
from common.paths import step_dir


def metrics_path(step: int, folder=None) -> pathlib.Path:
    """out/stepN/metrics.json, or FOLDER/metrics.json for a run written elsewhere."""
    return pathlib.Path(folder or step_dir(step)) / "metrics.json"


def read_metrics(step: int, folder=None) -> dict:
    path = metrics_path(step, folder)
    return json.loads(path.read_text()) if path.exists() else {}


def write_metrics(step: int, data: dict, section: str | None = None, folder=None) -> dict:
    """Merge `data` into out/stepN/metrics.json (under `section` if given), or into FOLDER/metrics.json
    when the run writes elsewhere (a script's --out), so the step's own figures stay its default run's.
    Returns the whole file."""
    metrics = read_metrics(step, folder)
    if section is None:
        metrics.update(data)
    else:
        metrics.setdefault(section, {}).update(data)
    atomic_write_text(metrics_path(step, folder), json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics
