"""``make release``: the student release in assignments/ is generated from solutions/, never edited.

nbgrader's generate_assignment is deterministic, so a re-run gives the same bytes; ``--force`` is
always used so a fresh clone (no gradebook yet) also records the assignment in the gradebook.
"""

from __future__ import annotations

from . import notebooks
from .api import make_api


class ReleaseError(RuntimeError):
    pass


def release(unit: str, api=None) -> None:
    """Regenerate ``assignments/<unit>/`` from ``solutions/<unit>/`` and record it in the gradebook."""
    api = api or make_api()
    result = api.generate_assignment(unit, force=True, create=True)
    if not result["success"]:
        raise ReleaseError(f"nbgrader could not release {unit}:\n{result.get('log')}\n{result.get('error')}")
    _strip_outputs(notebooks.release_notebook(unit))


def register(unit: str, scratch) -> None:
    """Record ``unit`` in the gradebook, as ``release`` does, but write the generated notebook
    under ``scratch``: grading must not rewrite assignments/, which others may be reading."""
    api = make_api(**{"CourseDirectory.release_directory": str(scratch)})
    result = api.generate_assignment(unit, force=True, create=True)
    if not result["success"]:
        raise ReleaseError(f"nbgrader could not record {unit}:\n{result.get('log')}\n{result.get('error')}")


def _strip_outputs(path) -> None:
    # nbgrader keeps outputs that are in the source; solutions are stored clean, but guard anyway.
    nb = notebooks.load(path)
    if any(c.get("outputs") for c in nb["cells"]):
        raise ReleaseError(f"{path} has outputs: strip the outputs of the solution notebook first")


def release_all(api=None) -> list[str]:
    api = api or make_api()
    done = []
    for unit in notebooks.units():
        release(unit, api)
        print(f"released {unit} -> {notebooks.release_notebook(unit).relative_to(notebooks.ROOT)}")
        done.append(unit)
    return done
