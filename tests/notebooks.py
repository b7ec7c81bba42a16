"""Run a step's notebook top to bottom, as a learner would, and return it with its outputs."""
import nbformat

from tests.verification import REPO_ROOT


def run_notebook(relative_path: str, timeout: int = 300):
    import nbclient

    path = REPO_ROOT / relative_path
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    return notebook


def outputs_text(notebook) -> str:
    return "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))


def has_image(notebook) -> bool:
    return any("image/png" in o.get("data", {}) for cell in notebook.cells for o in cell.get("outputs", []))
