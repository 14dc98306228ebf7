"""``make lectures``: execute every lecture once, then render it to HTML and reveal.js slides.

Output goes to ``build/lectures/`` (git-ignored): ``NN_topic.html``, ``NN_topic.slides.html`` and
the executed ``NN_topic.ipynb``. When npm is available, reveal.js and require.js are installed next
to the slides so they can be presented without internet; otherwise the slides load them from a CDN.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from . import notebooks

BUILD = notebooks.ROOT / "build" / "lectures"
VENDOR = "_vendor"
REVEAL = "reveal.js@4.6.0"  # the major version nbconvert's reveal template is written for
REQUIREJS = "requirejs@2.3.7"


def lecture_paths() -> list[Path]:
    return sorted(p for p in notebooks.LECTURES.glob("[0-9][0-9]_*.ipynb"))


def execute(path: Path, timeout: int = 600):
    """Run a lecture top to bottom in its own folder; returns the executed notebook node."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def _vendor_assets(out: Path) -> dict[str, str]:
    """Install reveal.js and require.js next to the slides when npm can; returns exporter settings."""
    modules = out / VENDOR / "node_modules"
    if not (modules / "reveal.js").is_dir() and shutil.which("npm"):
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix",
                        str(out / VENDOR), REVEAL, REQUIREJS], check=False, timeout=300)
    if (modules / "reveal.js" / "dist" / "reveal.js").is_file():
        return {"reveal_url_prefix": f"{VENDOR}/node_modules/reveal.js",
                "require_js_url": f"{VENDOR}/node_modules/requirejs/require.js"}
    print("npm unavailable: the slides will load reveal.js from a CDN")
    return {}


def render(nb, name: str, out: Path, vendor: dict[str, str]) -> list[Path]:
    """Write the executed notebook, its HTML and its reveal.js slides; returns the paths."""
    import nbformat
    from nbconvert import HTMLExporter, SlidesExporter

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.ipynb", out / f"{name}.html", out / f"{name}.slides.html"]
    nbformat.write(nb, str(paths[0]))
    html, _ = HTMLExporter().from_notebook_node(nb)
    paths[1].write_text(html, encoding="utf-8")
    slides_exporter = SlidesExporter(**vendor)
    slides, _ = slides_exporter.from_notebook_node(nb)
    paths[2].write_text(slides, encoding="utf-8")
    return paths


def render_all(out: Path = BUILD) -> None:
    os.environ.setdefault("LLMCOURSE_AUTOGRADER_ROOT", str(notebooks.ROOT))
    vendor = _vendor_assets(out)
    for path in lecture_paths():
        start = time.monotonic()
        nb = execute(path)
        written = render(nb, path.stem, out, vendor)
        print(f"{path.name}: executed in {time.monotonic() - start:.0f} s -> "
              + ", ".join(str(p.relative_to(notebooks.ROOT)) for p in written))
