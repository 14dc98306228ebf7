"""environment.yml (conda) and pyproject.toml (pip) ask for the same packages and ranges."""

from __future__ import annotations

import re
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"pytorch": "torch"}  # conda-forge name -> PyPI name
NOT_IN_PYPROJECT = {"python", "pip"}


def _split(req: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*(.*)$", req)
    name, spec = m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")
    return name, ",".join(sorted(filter(None, spec.split(","))))


def pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += [r for r in extra if not r.startswith("llmcourse")]
    return dict(_split(r) for r in reqs)


def conda_requirements() -> tuple[dict[str, str], str, list]:
    deps, python, pip_section, in_deps = {}, "", [], False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        if line.startswith("dependencies:"):
            in_deps = True
            continue
        m = re.match(r"^  - (\S.*)$", line)
        if in_deps and m and not m.group(1).startswith("pip:"):
            name, spec = _split(m.group(1))
            if name == "python":
                python = spec
            elif name not in NOT_IN_PYPROJECT:
                deps[CONDA_NAMES.get(name, name)] = spec
        elif in_deps and re.match(r"^      - ", line):
            pip_section.append(line.strip()[2:])
    return deps, python, pip_section


def test_same_packages_and_ranges():
    conda, _, _ = conda_requirements()
    pip = pyproject_requirements()
    assert conda == pip, (
        f"only in environment.yml: {sorted(set(conda) - set(pip))}; "
        f"only in pyproject.toml: {sorted(set(pip) - set(conda))}; "
        f"different ranges: {sorted(k for k in set(conda) & set(pip) if conda[k] != pip[k])}"
    )


def test_same_python_and_the_package_itself():
    _, python, pip_section = conda_requirements()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert python == project["requires-python"]
    assert "-e ." in pip_section and "--no-deps" in pip_section


def test_ranges_are_honest():
    pip = pyproject_requirements()
    assert pip["torch"] == ">=2.4", "pyproject keeps an honest torch range; the set-up path pins it"
    assert pip["nbgrader"] == "<0.10,>=0.9"
    assert "<2.1" in pip["sqlalchemy"]


def test_setup_pins_torch_in_the_same_pip_command():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"TORCH_PIN \?= torch==2\.13\.0", makefile)
    assert re.search(r'pip install .*"\$\(TORCH_PIN\)" -e', makefile)


def test_code_passes_the_linter():
    import subprocess
    import sys

    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run([str(ruff), "check", "llmcourse", "autograder", "tests"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
