"""pytest plugin: at the end of every run, print each step's verification list
with each item ticked (all its tests passed), crossed (one failed) or marked
not run. Shared fixtures for the tests live below it."""
import os
import sys

# The Triton kernels are tested on the CPU through Triton's interpreter, which is switched on
# when a kernel is defined: so before anything (torch._dynamo included) imports triton.
# Harmless elsewhere: in "auto" mode CPU tensors take the PyTorch path anyway.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests train tiny models, like --quick: one CPU thread each (common/device.py says why). Set here,
# before torch is imported, so it holds for every test, --quick or not, and for the processes they start.
os.environ.setdefault("OMP_NUM_THREADS", "1")
from collections import defaultdict

import pytest

from tests.verification import readme_items, readme_title, step_readmes


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "verifies(step, item): this test checks item `item` of step `step`'s verification list")
    # (step, item text) -> outcomes of the tests declaring it: "passed" / "failed" / "skipped".
    # Kept on the config, not in a global, so a pytest run inside a test keeps its own.
    config.verification_outcomes = defaultdict(list)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    markers = list(item.iter_markers("verifies"))
    if not markers:
        return
    if report.failed:
        outcome = "failed"
    elif report.skipped:
        outcome = "skipped"
    elif report.when == "call":
        outcome = "passed"
    else:
        return  # a passing setup or teardown says nothing on its own
    for marker in markers:
        item.config.verification_outcomes[tuple(marker.args)].append(outcome)


def _status(outcomes: list[str]) -> str:
    if not outcomes:
        return "not run"
    if "failed" in outcomes:
        return "failed"
    if "passed" in outcomes and "skipped" not in outcomes:
        return "passed"
    return "skipped"


def pytest_terminal_summary(terminalreporter):
    outcomes = terminalreporter.config.verification_outcomes
    if not outcomes:
        return
    fancy = (getattr(sys.stdout, "encoding", None) or "").lower().startswith("utf")
    marks = {"passed": "✓" if fancy else "+", "failed": "✗" if fancy else "x",
             "skipped": "-", "not run": "·" if fancy else "."}
    write = terminalreporter.write_line
    terminalreporter.section("verification lists")
    readmes = step_readmes()
    for step in sorted({step for step, _ in outcomes}):
        readme = readmes.get(step)
        items = readme_items(readme) if readme else []
        items += [text for s, text in outcomes if s == step and text not in items]
        statuses = [_status(outcomes.get((step, text), [])) for text in items]
        title = readme_title(readme) if readme else f"Step {step}"
        write(f"{title}  {statuses.count('passed')}/{len(items)}", bold=True)
        for text, status in zip(items, statuses):
            suffix = "" if status in ("passed", "failed") else f"  ({status})"
            write(f"  {marks[status]} {text}{suffix}", red=status == "failed", green=status == "passed")


# ----------------------------------------------------------------------------- shared fixtures

@pytest.fixture(scope="session", autouse=True)
def keep_out_dir_clean(tmp_path_factory):
    """Tests never write into the learner's out/: step_dir() points into a temporary folder."""
    import common.paths

    out = tmp_path_factory.mktemp("out")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common.paths, "OUT_DIR", out)
        yield out


@pytest.fixture(autouse=True)
def not_quick_until_asked(keep_out_dir_clean):
    """A --quick main() switches the process to out/quick/ (common/paths.py); every test starts
    at the session's temporary out/, whatever the tests (and fixtures) before it ran."""
    import common.paths

    common.paths.OUT_DIR = keep_out_dir_clean
    yield
    common.paths.OUT_DIR = keep_out_dir_clean


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """Steps 1 and 3 at --quick size, made once per test session and shared by every step's tests:
    a tokenizer, the tokenized corpus and a pretrained model, all under one temporary folder."""
    from types import SimpleNamespace

    from step1_tokenizer import train_tokenizer
    from step3_pretrain import data, train_pretrain

    root = tmp_path_factory.mktemp("quick_run")
    run = SimpleNamespace(root=root, tokenizer=root / "tokenizer.json", data=root / "data",
                          pretrain=root / "pretrain", model=root / "pretrain" / "model.pt")
    train_tokenizer.main(["--quick", "--out", str(run.tokenizer)])
    data.main(["--quick", "--tokenizer", str(run.tokenizer), "--out", str(run.data)])
    run.pretrain_result = train_pretrain.main(["--quick", "--data", str(run.data), "--tokenizer",
                                               str(run.tokenizer), "--out", str(run.pretrain)])
    return run
