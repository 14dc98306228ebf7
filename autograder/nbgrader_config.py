"""nbgrader configuration for the course. nbgrader finds it when run from this folder
(``cd autograder && nbgrader ...``); the course's own tools load it by path.

Folders: ``solutions/`` is nbgrader's source, ``assignments/`` its release; everything nbgrader
writes while grading (submitted/, autograded/, feedback/, gradebook.db) stays in this folder and
out of git.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from autograder.preprocessors import (  # noqa: E402
    DropEmptyNbgraderMetadata,
    RestoreDeletedGradeCells,
    ScrubHiddenTests,
)

# Where grading state lives. Tests point this at a temporary folder so they never touch a TA's
# real gradebook.
STATE = os.path.abspath(os.environ.get("LLMCOURSE_GRADING_DIR") or HERE)
os.makedirs(STATE, exist_ok=True)

c = get_config()  # noqa: F821  (provided by traitlets' config loader)

c.CourseDirectory.root = ROOT
c.CourseDirectory.course_id = "llm-course"
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "assignments"
c.CourseDirectory.submitted_directory = os.path.join(STATE, "submitted")
c.CourseDirectory.autograded_directory = os.path.join(STATE, "autograded")
c.CourseDirectory.feedback_directory = os.path.join(STATE, "feedback")
c.CourseDirectory.db_url = "sqlite:///" + os.path.join(STATE, "gradebook.db")
# Only notebooks are released and graded; nothing else in a student's folder is copied around.
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "feedback", ".*"]

# Students are created as they are graded; TAs need no roster for the demo.
c.Autograde.create_student = True
# Duplicated cells (copied grade_id) are tolerated and deleted grade cells restored: see
# autograder/preprocessors.py.
c.Autograde.sanitize_preprocessors = [
    "nbgrader.preprocessors.ClearOutput",
    "nbgrader.preprocessors.DeduplicateIds",
    DropEmptyNbgraderMetadata,
    RestoreDeletedGradeCells,
    "nbgrader.preprocessors.OverwriteKernelspec",
    "nbgrader.preprocessors.OverwriteCells",
    "nbgrader.preprocessors.CheckCellMetadata",
]

# Each kernel runs in its bubblewrap sandbox, with its output capped (autograder/sandbox.py).
c.Autograde.autograde_preprocessors = [
    "autograder.sandbox.SandboxedExecute",
    "nbgrader.preprocessors.IgnorePattern",
    "nbconvert.preprocessors.ClearMetadataPreprocessor",
    "nbgrader.preprocessors.LimitOutput",
    "nbgrader.preprocessors.SaveAutoGrades",
    "nbgrader.preprocessors.AssignLatePenalties",
    "nbgrader.preprocessors.CheckCellMetadata",
]

# A deleted test cell comes back from the gradebook instead of silently scoring nothing; the
# course's RestoreDeletedGradeCells does it (nbgrader's add_missing_cells fails on this layout).
c.OverwriteCells.add_missing_cells = False

# Per-cell limit: an infinite loop costs one cell, not the whole class. The whole submission
# also has an overall limit, enforced by autograder/grade.py.
c.Execute.timeout = int(os.environ.get("LLMCOURSE_CELL_TIMEOUT", "60"))
c.Execute.interrupt_on_timeout = True
c.Execute.startup_timeout = 120

# A huge output (a print in a loop) is cut instead of bloating the gradebook and the feedback.
c.LimitOutput.max_lines = 200
c.LimitOutput.max_traceback = 60

# Feedback never shows hidden-test source: neither the hidden region of a test cell nor a
# traceback line that quotes it.
c.GenerateFeedback.preprocessors = [
    "nbgrader.preprocessors.GetGrades",
    ScrubHiddenTests,
    "nbconvert.preprocessors.CSSHTMLHeaderPreprocessor",
]
