"""TA intake: turn the zip an LMS exports into nbgrader's ``<student>/<assignment>/`` layout.

Like nbgrader's ``zip_collect``, file names are matched with a named regular expression through
nbgrader's own ``FileNameCollectorPlugin``. The default pattern reads Canvas' export names,
``<student>_<late_>?<user id>_<submission id>_<original file name>``; a zip that already holds
``<student>/<assignment>/<assignment>.ipynb`` folders is used as it is.
"""

from __future__ import annotations

import re
import tempfile
import zipfile
from pathlib import Path

from . import notebooks

CANVAS_PATTERN = r"^(?P<student_id>[^_/]+)_(?:late_)?\d+_\d+_(?P<file_id>.+\.ipynb)$"


def _assignment_of(file_id: str, only: str | None) -> str | None:
    if only:
        return only
    for unit in notebooks.units():
        if file_id.startswith(unit):
            return unit
    return None


def unpack_lms_zip(archive: Path, assignment: str | None = None,
                   pattern: str = CANVAS_PATTERN) -> Path:
    """Extract ``archive`` and return a folder in nbgrader's submission layout.

    Files whose names do not match ``pattern`` are reported and skipped. When one student
    submitted several notebooks for an assignment, the last in name order wins (LMSs number
    resubmissions upwards).
    """
    from nbgrader.plugins.zipcollect import FileNameCollectorPlugin

    work = Path(tempfile.mkdtemp(prefix="llmcourse-intake-"))
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(work / "extracted")
    extracted = work / "extracted"
    if any(p.suffix == ".ipynb" and p.stem == p.parent.name for p in extracted.glob("*/*/*.ipynb")):
        return extracted

    collector = FileNameCollectorPlugin(named_regexp=pattern)
    layout = work / "submissions"
    for path in sorted(extracted.rglob("*.ipynb")):
        info = collector.collect(path.name)
        unit = _assignment_of(info["file_id"], assignment) if info else None
        if not info or not unit:
            print(f"intake: skipped {path.name} (no student or assignment in its name)")
            continue
        student = re.sub(r"[^A-Za-z0-9_.-]", "_", info["student_id"])
        dest = layout / student / unit / f"{unit}.ipynb"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(path.read_bytes())
    return layout
