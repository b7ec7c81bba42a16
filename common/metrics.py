"""out/stepN/metrics.json: each step's measured figures, gathered by run_all.py
into out/report.md."""
import json

from common.checkpoint import atomic_write_text
from common.paths import step_dir


def read_metrics(step: int) -> dict:
    path = step_dir(step) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_metrics(step: int, data: dict, section: str | None = None) -> dict:
    """Merge `data` into out/stepN/metrics.json (under `section` if given); return the whole file."""
    metrics = read_metrics(step)
    if section is None:
        metrics.update(data)
    else:
        metrics.setdefault(section, {}).update(data)
    atomic_write_text(step_dir(step) / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics
