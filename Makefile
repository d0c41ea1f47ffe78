# make install | make demo | make test   (see README.md)
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint clean-cache gpu-check

install: $(STAMP)

# torch/torchvision are pinned here, not in pyproject.toml: these releases lie on the build
# machines' local wheel store; users elsewhere get any compatible release from pyproject.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The embedded default experiment: elpv, fixed Lite0 features + 3 classifiers vs fine-tuning.
demo: install
	$(BIN)/bottleneck run pipelines/elpv.toml

test: install
	$(PY) -m pytest -q

# Every CUDA path, timed, in one Markdown table (docs/benchmarks.md, "GPU check"); a dry run without CUDA.
gpu-check: install
	$(PY) benchmarks/gpu_check.py --out gpu_check.md

lint: install
	$(BIN)/ruff check bottleneck tests benchmarks

clean-cache:
	rm -rf cache/*.h5 cache/*.parts cache/*.lock cache/*.tmp
