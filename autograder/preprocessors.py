"""nbgrader preprocessors the course adds to its pipeline.

``DropEmptyNbgraderMetadata`` (autograde): a cell duplicated in JupyterLab or Colab copies its
``grade_id``; nbgrader's ``DeduplicateIds`` then empties the copy's metadata, which its own
``OverwriteCells`` trips over (KeyError 'grade_id'). Dropping the empty dict fixes that.

``ScrubHiddenTests`` (feedback): what a student may see in feedback has no hidden test, in the
source or in a traceback. nbgrader's feedback HTML shows each test cell as it ran, hidden region included, and IPython's
traceback of a failing test quotes the lines around the failure (jupyter/nbgrader#1363). This
preprocessor, run by ``GenerateFeedback``, drops the hidden region from every test cell and
reduces the traceback of a failing test cell to its final ``Error: message`` line. The hidden
tests write messages meant for students (what was expected, on which input), so nothing of
value is lost.
"""

from __future__ import annotations

from nbgrader.preprocessors import NbGraderPreprocessor

BEGIN, END = "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"


def strip_hidden_region(text: str) -> str:
    """``text`` without the lines from a BEGIN HIDDEN TESTS line to its END line (inclusive)."""
    kept, hidden = [], False
    for line in text.split("\n"):
        if BEGIN in line:
            hidden = True
        elif END in line:
            hidden = False
        elif not hidden:
            kept.append(line)
    return "\n".join(kept).rstrip()


def is_test_cell(cell) -> bool:
    meta = cell.metadata.get("nbgrader", {})
    return bool(meta.get("grade")) and not meta.get("solution") and cell.cell_type == "code"


class ScrubHiddenTests(NbGraderPreprocessor):
    """Remove hidden-test source and test tracebacks from notebooks before they become feedback."""

    def preprocess_cell(self, cell, resources, cell_index):
        if not is_test_cell(cell):
            return cell, resources
        had_hidden = BEGIN in cell.source
        cell.source = strip_hidden_region(cell.source)
        if had_hidden:
            cell.source += "\n# (hidden tests ran here)"
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                output["traceback"] = [f"{output.get('ename', 'Error')}: {output.get('evalue', '')}"]
        return cell, resources


class DropEmptyNbgraderMetadata(NbGraderPreprocessor):
    """Remove the empty ``nbgrader`` metadata that ``DeduplicateIds`` leaves on duplicated cells."""

    def preprocess_cell(self, cell, resources, cell_index):
        if "nbgrader" in cell.metadata and not cell.metadata["nbgrader"].get("grade_id"):
            del cell.metadata["nbgrader"]
        return cell, resources
