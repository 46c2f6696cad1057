"""Install extras: `test` holds what the tests need, `docs` the docs build; CI installs both."""

import configparser
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _extras() -> dict[str, set[str]]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    section = config["options.extras_require"]
    return {name: set(section[name].split()) for name in section}


def _pip_extras(text: str) -> list[set[str]]:
    """The extras of every `pip install ".[a,b]"` in `text`."""
    return [set(m.split(",")) for m in re.findall(r"pip install \"\.\[([\w,]+)\]\"", text)]


def test_test_extra_is_what_the_tests_need():
    extras = _extras()
    assert extras["test"] == {"pytest", "ruff"}
    assert "sphinx" in extras["docs"]


def test_ci_installs_the_docs_tools_for_the_docs_test():
    """tests/e2e/test_docs.py skips without sphinx; CI must not skip it."""
    assert _pip_extras((ROOT / ".ci" / "run").read_text()) == [{"test", "docs"}]


def test_readme_installs_what_ci_installs():
    """.ci/run installs "exactly as the README says" (its quick start)."""
    ci = _pip_extras((ROOT / ".ci" / "run").read_text())
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert _pip_extras(quick_start)[:1] == ci
