# LLMs from the ground up: one entry point for students, TAs, instructors and CI.
# `make demo` and `make test` set everything up on a fresh clone; the other targets reuse it.

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# Submissions graded side by side: one per core unless told (make demo WORKERS=1).
WORKERS ?= $(shell nproc 2>/dev/null || echo 1)
# torch is pinned in the same pip command as the project so the resolver never picks another
# build: 2.13.0 has a CPU wheel on the course machines, while an unpinned torch pulls CUDA.
TORCH_PIN ?= torch==2.13.0
STAMP  := $(VENV)/.installed
SUBMISSIONS ?= autograder/samples
# A data mirror beside the checkout (as on the course's CI machines) is used when present;
# otherwise the loader downloads into ~/.cache/llmcourse. Kernels run elsewhere: keep it absolute.
LLMCOURSE_DATA_DIR ?= $(abspath $(wildcard ../shared/data))
export LLMCOURSE_DATA_DIR
ASSIGNMENT ?=
# One test file per core: a file's session fixtures (the demo gradebook) are built once.
PYTEST_ARGS ?= -n auto --dist loadfile

.PHONY: setup sandbox-tools demo test release references samples autograde lectures lint clean

setup: $(STAMP) sandbox-tools

## sandbox-tools: bubblewrap, which every grading kernel runs in (installed from Debian when root)
sandbox-tools:
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap) >/dev/null 2>&1; } \
	  || echo "note: bubblewrap is not installed; grading runs UNSANDBOXED (README, 'Grading safely')"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)" -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

## release: regenerate assignments/ from solutions/ (deterministic) and the exported references
release: setup
	$(BIN)/python -m autograder.build release

references: setup
	$(BIN)/python -m autograder.build references

samples: setup
	$(BIN)/python -m autograder.build samples

## autograde: grade a folder in nbgrader's <student>/<assignment>/<notebook>.ipynb layout, or an LMS zip
autograde: setup
	$(BIN)/python -m autograder.grade $(SUBMISSIONS) --workers $(WORKERS) $(if $(ASSIGNMENT),--assignment $(ASSIGNMENT)) $(if $(SCHEDULER),--scheduler $(SCHEDULER))

## demo: release, autograde the bundled sample submissions, print the gradebook
demo: release
	$(BIN)/python -m autograder.grade autograder/samples --workers $(WORKERS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## lectures: execute every lecture and render it to HTML and reveal.js slides under build/
lectures: setup
	$(BIN)/python -m autograder.build lectures

lint: setup
	$(BIN)/ruff check llmcourse autograder tests

clean:
	rm -rf build autograder/submitted autograder/autograded autograder/feedback \
	       autograder/gradebook.db autograder/grades.csv autograder/graded.json \
	       autograder/logs autograder/released .pytest_cache
