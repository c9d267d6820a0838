# One entry point for a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PACKAGES := packages/gigagan-core packages/gigagan-losses packages/gigagan-upsampler packages/gigagan-train
TORCH  := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: setup demo upsample-demo test lint typecheck bench bench-ref wheels clean

setup: $(STAMP)

# Reinstall when a distribution's metadata changes (entry points live there).
$(STAMP): pyproject.toml $(addsuffix /pyproject.toml,$(PACKAGES))
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=25.1"
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q --group dev
	$(BIN)/python -m pip install -q --no-build-isolation $(addprefix -e ,$(PACKAGES))
	touch $@

# Trains the built-in demo run (about 10 minutes on 2 CPU cores), then samples a grid of
# captions from it: runs/demo/samples/ has the grids written during training.
DEMO_PROMPTS := "a red circle on a blue background" "a yellow square on a black background" \
	"a white triangle on a green background" "an orange ring on a purple background" \
	"a blue circle on a white background" "a green square on a red background"

demo: setup
	$(BIN)/gigagan train demo --overwrite
	$(BIN)/gigagan sample runs/demo --prompt $(DEMO_PROMPTS) -n 6 --seed 1 --out runs/demo/grid.png

# Trains the built-in upsampler run (16 -> 64 px, about 10 minutes on 2 CPU cores), scores
# it beside bicubic and bilinear on held-out pairs; runs/upsample-demo/samples/ has grids of
# input, bicubic, output and target written during training.
upsample-demo: setup
	$(BIN)/gigagan train upsample-demo --overwrite
	$(BIN)/gigagan eval runs/upsample-demo --baselines bicubic bilinear --out runs/upsample-demo/eval.json

# What CI runs: lint, the type check of gigagan-train, then the test suite.
test: lint typecheck
	$(BIN)/python -m pytest -n 2 -q

lint: setup
	$(BIN)/ruff check packages examples tests benchmarks
	$(BIN)/ruff format --check packages examples tests benchmarks

typecheck: setup
	$(BIN)/python -m mypy

bench: setup
	for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

# The training step against gigagan-pytorch 0.3.0, which lives in its own venv (same torch).
REF_VENV := .venv-ref
$(REF_VENV)/.installed:
	test -x $(REF_VENV)/bin/python || $(PYTHON) -m venv $(REF_VENV)
	$(REF_VENV)/bin/python -m pip install -q $(TORCH) gigagan-pytorch==0.3.0
	touch $@

bench-ref: setup $(REF_VENV)/.installed
	$(BIN)/python benchmarks/bench_vs_reference.py --ref-python $(REF_VENV)/bin/python

wheels: setup
	$(BIN)/python -m pip wheel -q --no-deps --no-build-isolation -w dist $(PACKAGES)

clean:
	rm -rf $(VENV) dist build runs
