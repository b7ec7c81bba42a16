"""The verification lists: what each step README promises, and which tests check it.

A README ends with

    ## Verification list
    - [ ] decode(encode(s)) == s for any Unicode string

and a test declares the same words:

    @pytest.mark.verifies(1, "decode(encode(s)) == s for any Unicode string")

`tests/conftest.py` ticks the items at the end of a run, and
`tests/test_verification_lists.py` checks that README and tests hold the same
list, word for word, so the docs and the tests cannot drift apart.
"""
import ast
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = REPO_ROOT / "tests"


def step_readmes() -> dict[int, Path]:
    """{step number: README path} for every stepN_* folder with a README."""
    found = {}
    for readme in sorted(REPO_ROOT.glob("step[0-9]*_*/README.md")):
        found[int(re.match(r"step(\d+)", readme.parent.name).group(1))] = readme
    return found


def readme_title(readme: Path) -> str:
    for line in readme.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return readme.parent.name


def readme_items(readme: Path) -> list[str]:
    """The `- [ ] item` lines under the '## Verification list' heading."""
    items, inside = [], False
    for line in readme.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            inside = line[3:].strip().lower().startswith("verification list")
        elif inside:
            match = re.match(r"\s*- \[[ xX]\] (.+)", line)
            if match:
                items.append(match.group(1).strip())
    return items


def declared_items() -> dict[int, list[str]]:
    """{step: [item text, ...]} from every `pytest.mark.verifies(step, "text")` in tests/test_*.py."""
    declared: dict[int, list[str]] = {}
    for path in sorted(TESTS_DIR.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "verifies" and len(node.args) == 2
                    and all(isinstance(a, ast.Constant) for a in node.args)):
                step, text = (a.value for a in node.args)
                if text not in declared.setdefault(step, []):
                    declared[step].append(text)
    return declared
