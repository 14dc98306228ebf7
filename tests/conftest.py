"""Shared fixtures. The repository root goes on sys.path so `autograder.*` imports work in pytest
exactly as they do inside a grading kernel."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tests never touch the network: data comes from the mirror CI points at, hub calls are offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
_shared_data = ROOT.parent / "shared" / "data"
if "LLMCOURSE_DATA_DIR" not in os.environ and _shared_data.is_dir():
    os.environ["LLMCOURSE_DATA_DIR"] = str(_shared_data.resolve())


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one torch thread is faster and steadier on a busy 2-core machine. A unit's test
    module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    from llmcourse.runtime import single_thread

    with single_thread():
        yield
