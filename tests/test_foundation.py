"""The repository's own promises: CI runs the README's test command, scripts start
from any folder, the verification-list plugin ticks and crosses items."""
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from tests.verification import REPO_ROOT

pytest_plugins = ["pytester"]

SCRIPTS = sorted(p for p in REPO_ROOT.glob("step[0-9]*_*/*.py") if p.name != "__init__.py"
                 and "def main(" in p.read_text(encoding="utf-8"))


def readme_test_command() -> str:
    """The second command of the README's quick start."""
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", (REPO_ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    commands = [line.strip() for block in blocks for line in block.splitlines() if "pytest" in line]
    assert commands, "README.md has no test command in a code block"
    return commands[0]


def test_ci_runs_the_readme_test_command():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert readme_test_command() in ci.splitlines()
    assert ci.index("torch==2.13.0") < ci.index(readme_test_command())


def test_every_script_starts_from_its_own_folder_and_as_a_module():
    """--help from inside the script's folder (sys.path lacks the repo root there), and one `python -m`."""
    def run(args, cwd):
        return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)

    jobs = [([script.name, "--help"], script.parent) for script in SCRIPTS]
    jobs.append((["-m", "step1_tokenizer.train_tokenizer", "--help"], REPO_ROOT))
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: run(*job), jobs))
    failed = [f"{' '.join(args)} in {cwd.name}: {r.stderr.strip().splitlines()[-1:]}"
              for (args, cwd), r in zip(jobs, results) if r.returncode != 0 or "usage" not in r.stdout]
    assert len(SCRIPTS) >= 5
    assert not failed, failed


def test_plugin_prints_each_step_list_ticked_and_crossed(pytester):
    pytester.makeconftest("pytest_plugins = ['tests.conftest']")
    pytester.makepyfile('''
        import pytest

        @pytest.mark.verifies(99, "alpha holds")
        def test_alpha():
            assert True

        @pytest.mark.verifies(99, "beta holds")
        def test_beta():
            assert False
    ''')
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "Step 99  1/2" in out
    assert re.search(r"(✓|\+) alpha holds", out) and re.search(r"(✗|x) beta holds", out)
