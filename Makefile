# kernel-autotune: every command the README gives goes through here.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data demo train test test-correctness bench lint clean

setup: $(STAMP) data

# torch<=2.14.1 and torchvision come from this machine's local wheel store when it has one
# (about a minute); elsewhere pip downloads them.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,postgres]'
	touch $(STAMP)

# Real Fashion-MNIST (MNIST's IDX format) from Debian, for the training example offline.
# Skipped quietly where apt-get is missing or we are not root; the example then says what to do.
data:
	@if [ ! -d $(FASHION_MNIST) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
		|| (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1) \
		|| echo "note: could not install dataset-fashion-mnist; the LeNet example needs MNIST under ./data"; \
	fi

demo: setup
	$(BIN)/autotune search conv2d --shape 3x32x32

train: setup
	$(BIN)/python examples/train_lenet.py --tuned

test: setup
	$(BIN)/pytest -q -m "not slow and not gpu"

test-correctness: setup
	$(BIN)/pytest -q -k correctness

bench: setup
	$(BIN)/autotune bench --suite lenet --batches 1,16,64,256

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
