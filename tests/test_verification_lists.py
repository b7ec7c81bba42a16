"""Each step README's verification list and the items the tests declare are the same list, word for word."""
import pytest

from tests.verification import declared_items, readme_items, step_readmes

READMES = step_readmes()


@pytest.mark.parametrize("step", sorted(READMES))
def test_readme_list_matches_declared_tests(step):
    in_readme = readme_items(READMES[step])
    in_tests = declared_items().get(step, [])
    assert len(set(in_readme)) == len(in_readme), f"{READMES[step]}: an item is listed twice"
    missing_tests = [t for t in in_readme if t not in in_tests]
    missing_docs = [t for t in in_tests if t not in in_readme]
    assert not missing_tests, f"{READMES[step]}: items with no test declaring them: {missing_tests}"
    assert not missing_docs, f"tests declare items missing from {READMES[step]}: {missing_docs}"


def test_every_declared_step_has_a_readme():
    assert set(declared_items()) <= set(READMES)
