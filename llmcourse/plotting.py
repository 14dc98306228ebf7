"""The course's plots. Each returns the matplotlib ``Axes`` it drew on, so a lecture can add to it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence


def _axes(ax=None, figsize=(6, 4)):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_curves(
    curves: Mapping[str, Sequence[float]],
    xs: Mapping[str, Sequence[float]] | Sequence[float] | None = None,
    *,
    xlabel: str = "step",
    ylabel: str = "loss",
    title: str | None = None,
    logx: bool = False,
    logy: bool = False,
    marker: str | None = None,
    ax=None,
):
    """One line per named series: ``curves = {"train": [...], "dev": [...]}``.

    ``xs`` is one shared x sequence, a mapping with one per series, or None for 0, 1, 2, ...
    """
    ax = _axes(ax)
    for name, ys in curves.items():
        x = xs.get(name) if isinstance(xs, Mapping) else xs
        x = list(range(len(ys))) if x is None else x
        ax.plot(x, ys, label=name, marker=marker)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if len(curves) > 1:
        ax.legend()
    ax.grid(True, alpha=0.3)
    return ax


def zipf_plot(counts: Iterable[int], *, label: str = "corpus", fit: bool = True, ax=None):
    """Frequency against rank on log-log axes, with the ideal ``f = f_1 / rank`` line for reference.

    ``counts``: the frequency of every type (any order).
    """
    ax = _axes(ax)
    freqs = sorted((c for c in counts if c > 0), reverse=True)
    ranks = range(1, len(freqs) + 1)
    ax.loglog(ranks, freqs, ".", markersize=3, label=label)
    if fit and freqs:
        ax.loglog(ranks, [freqs[0] / r for r in ranks], "--", label="Zipf: f = f1 / rank")
    ax.set_xlabel("rank")
    ax.set_ylabel("frequency")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    return ax


def heatmap(
    matrix,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    *,
    title: str | None = None,
    annotate: bool = False,
    fmt: str = "{:.2f}",
    cmap: str = "viridis",
    ax=None,
):
    """A labelled heatmap of a 2-D array-like (rows x columns), optionally with each value printed."""
    import numpy as np

    values = np.asarray(matrix, dtype=float)
    ax = _axes(ax, figsize=(1 + 0.5 * values.shape[1], 1 + 0.4 * values.shape[0]))
    image = ax.imshow(values, cmap=cmap, aspect="auto")
    ax.figure.colorbar(image, ax=ax)
    if row_labels is not None:
        ax.set_yticks(range(len(row_labels)), labels=row_labels)
    if col_labels is not None:
        ax.set_xticks(range(len(col_labels)), labels=col_labels, rotation=45, ha="right")
    if annotate:
        mid = (np.nanmax(values) + np.nanmin(values)) / 2 if values.size else 0
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, fmt.format(v), ha="center", va="center",
                    color="white" if v < mid else "black", fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def bar(labels: Sequence[str], values: Sequence[float], *, ylabel: str = "", title: str | None = None,
        ax=None):
    """A simple labelled bar chart (e.g. a distribution over next words)."""
    ax = _axes(ax)
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(labels)), labels=labels, rotation=45, ha="right")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return ax


def show_table(header: Sequence[str], rows: Iterable[Sequence], fmt: str = "{:,.2f}") -> str:
    """Display rows as a Markdown table in a notebook (printed elsewhere); returns the Markdown.

    Floats are formatted with ``fmt`` (infinity as ∞); ``<``, ``>`` and ``|`` are escaped so that
    tokens such as ``<s>`` show as text.
    """
    def cell(x) -> str:
        text = ("∞" if x == float("inf") else fmt.format(x)) if isinstance(x, float) else str(x)
        return text.replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    markdown = "\n".join(lines)
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(Markdown(markdown))
    else:
        print(markdown)
    return markdown
