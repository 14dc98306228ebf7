"""Helper package for "LLMs from the ground up".

One module per job:

- ``llmcourse.data``: the data loader (canonical URL + sha256 + cache + ``LLMCOURSE_DATA_DIR`` mirror)
  and the small text-processing helpers that lectures and assignments share.
- ``llmcourse.runtime``: device choice (CUDA, then MPS, then CPU), seeds, and ``fast_mode()``.
- ``llmcourse.training``: batches (context windows, random chunks), the one training loop with its
  tqdm bar and loss history, and evaluation over a whole split.
- ``llmcourse.plotting``: the course's plots (curves, Zipf, heatmaps).
- ``llmcourse.models``: the course's GPT (GPT-2's architecture, ``GPT.from_hf`` copies a Hugging Face
  ``GPT2LMHeadModel``): unit 05's answer, which units 06-09 build on (unit 05 forbids it).
- ``llmcourse.grading``: what the tests use: comparisons with helpful messages, the device loop,
  the forbidden-call guard, and the loader of hidden tests.

Nothing in here is the answer to an assignment: references of unit NN reach students only with
later units.
"""

__version__ = "0.1.0"
