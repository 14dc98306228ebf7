"""The course's plots and tables (llmcourse.plotting), drawn off-screen."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

from llmcourse.plotting import bar, heatmap, plot_curves, show_table, zipf_plot  # noqa: E402


def test_show_table_escapes_tokens_and_formats_floats(capsys):
    markdown = show_table(["token", "p", "count"], [["<s>", 0.12345, 3], ["a|b", math.inf, 10_000]],
                          fmt="{:.3f}")
    assert markdown.splitlines() == ["| token | p | count |", "| --- | --- | --- |",
                                     "| &lt;s&gt; | 0.123 | 3 |", "| a\\|b | ∞ | 10000 |"]
    assert capsys.readouterr().out.strip() == markdown  # outside a notebook it prints


def test_plots_return_their_axes():
    ax = plot_curves({"train": [3.0, 2.0, 1.5], "dev": [3.1, 2.4]}, logy=True, title="loss")
    assert [line.get_label() for line in ax.get_lines()] == ["train", "dev"] and ax.get_yscale() == "log"
    assert zipf_plot([100, 50, 33, 25]) is not None
    ax = heatmap([[0.1, 0.9], [0.5, 0.5]], ["x", "y"], ["a", "b"], annotate=True)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    assert [t.get_text() for t in bar(["a", "b"], [1.0, 2.0]).get_xticklabels()] == ["a", "b"]
