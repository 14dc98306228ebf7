"""nbgrader preprocessors the course adds to its pipeline.

``DropEmptyNbgraderMetadata`` (autograde): a cell duplicated in JupyterLab or Colab copies its
``grade_id``; nbgrader's ``DeduplicateIds`` then empties the copy's metadata, which its own
``OverwriteCells`` trips over (KeyError 'grade_id'). Dropping the empty dict fixes that.

``RestoreDeletedGradeCells`` (autograde): a deleted test cell comes back from the gradebook, so
it still counts. nbgrader's own ``OverwriteCells.add_missing_cells`` raises a KeyError when the
cell before the deleted one is a read-only cell, which every test cell here follows.

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


class RestoreDeletedGradeCells(NbGraderPreprocessor):
    """Put every grade cell missing from a submission back, after the nearest cell before it in
    the source notebook that the submission still has. ``OverwriteCells`` then fills it in."""

    def preprocess(self, nb, resources):
        from nbformat.v4 import new_code_cell, new_markdown_cell
        from nbgrader.api import Gradebook

        info = resources["nbgrader"]
        with Gradebook(info["db_url"]) as gb:
            source_nb = gb.find_notebook(info["notebook"], info["assignment"])
            order = [(c.name, c.cell_type, c.source) for c in source_nb.source_cells]
            grade_points = {c.name: c.max_score for c in source_nb.grade_cells}
            solutions = {c.name for c in source_nb.solution_cells}

        present = {c.metadata["nbgrader"]["grade_id"]: c for c in nb.cells
                   if c.metadata.get("nbgrader", {}).get("grade_id")}
        anchor = None  # the last source cell found in the submission so far
        for name, cell_type, source in order:
            if name in present:
                anchor = present[name]
                continue
            if name not in grade_points:
                continue
            self.log.warning("Grade cell %s was deleted; restoring it from the gradebook", name)
            make = new_code_cell if cell_type == "code" else new_markdown_cell
            cell = make(source=source)
            cell.metadata["nbgrader"] = {
                "grade": True, "grade_id": name, "locked": name not in solutions,
                "points": grade_points[name], "schema_version": 3,
                "solution": name in solutions, "task": False,
            }
            index = nb.cells.index(anchor) + 1 if anchor is not None else 0
            nb.cells.insert(index, cell)
            present[name] = anchor = cell
        return nb, resources
