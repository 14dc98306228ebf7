"""Build steps behind the make targets: release, references, samples, lectures.

    python -m autograder.build release      # assignments/ from solutions/, plus the references
    python -m autograder.build references   # only the exported references
    python -m autograder.build samples      # the bundled sample submissions
    python -m autograder.build lectures     # executed HTML and reveal.js slides under build/
"""

from __future__ import annotations

import argparse
import sys

from . import notebooks


def cmd_references() -> None:
    for path in notebooks.write_references():
        print(f"wrote {path.relative_to(notebooks.ROOT)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["release", "references", "samples", "lectures"])
    args = parser.parse_args(argv)
    if args.step == "references":
        cmd_references()
    elif args.step == "release":
        from .release import release_all

        cmd_references()  # first: a unit's release ships copies of earlier units' references
        release_all()
    elif args.step == "samples":
        from .samples import write_samples

        write_samples()
    elif args.step == "lectures":
        from .lectures import render_all

        render_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
