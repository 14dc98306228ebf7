"""Helper package for "LLMs from the ground up".

One module per job:

- ``llmcourse.data``: the data loader (canonical URL + sha256 + cache + ``LLMCOURSE_DATA_DIR`` mirror)
  and the small text-processing helpers that lectures and assignments share.
- ``llmcourse.runtime``: device choice (CUDA, then MPS, then CPU), seeds, and ``fast_mode()``.
- ``llmcourse.training``: batches (context windows, random chunks), the one training loop with its
  tqdm bar and loss history, and evaluation over a whole split.
- ``llmcourse.plotting``: the course's plots (curves, Zipf, heatmaps).
- ``llmcourse.grading``: what the tests use: comparisons with helpful messages, the device loop,
  the forbidden-call guard, and the loaders of hidden tests and of earlier units' references.

Nothing in here is the answer to an assignment (a test checks it): the references live with the
autograder, exported from the solution notebooks, and reach students only with later units.
"""

__version__ = "0.1.0"
