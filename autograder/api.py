"""One way to get nbgrader's Python API configured for this course (about 2x faster than its CLI)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG_FILE = HERE / "nbgrader_config.py"


def load_config(**overrides):
    """The course's nbgrader config, with optional ``{"Section.key": value}`` overrides."""
    from traitlets.config import Config
    from traitlets.config.loader import PyFileConfigLoader

    cfg = PyFileConfigLoader(CONFIG_FILE.name, path=str(HERE)).load_config()
    extra = Config()
    for dotted, value in overrides.items():
        section, key = dotted.rsplit(".", 1)
        extra[section][key] = value
    cfg.merge(extra)
    return cfg


def _venv_on_path() -> None:
    # nbgrader shells out to `alembic` when it opens a gradebook; a venv used without activating
    # it (`.venv/bin/python -m ...`) has that script only in its own bin folder.
    bin_dir = os.path.dirname(sys.executable)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def make_api(quiet: bool = True, **overrides):
    """An ``NbGraderAPI`` bound to the course directories (solutions/, assignments/, autograder/)."""
    _venv_on_path()
    from nbgrader.apps import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory

    cfg = load_config(**overrides)
    api = NbGraderAPI(coursedir=CourseDirectory(config=cfg), config=cfg)
    if quiet:
        api.log.setLevel(logging.ERROR)
    return api


def db_url(**overrides) -> str:
    return load_config(**overrides).CourseDirectory.db_url
