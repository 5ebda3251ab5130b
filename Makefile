# `make demo` and `make test` set everything up themselves; setup is a no-op once done.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
# A CPU build of torch lies on disk here; a bare `torch` would download a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
EXTRAS ?= dev,faiss,deepspeed

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

# accelerate launch sets OMP_NUM_THREADS=1 unless told otherwise: give the one process both cores.
ACCELERATE_1CPU := $(BIN)/accelerate launch --num_processes 1 --num_machines 1 \
	--num_cpu_threads_per_process 2 --mixed_precision no --dynamo_backend no

demo: setup
	$(BIN)/python tools/make_shards.py --sample-images --output data/demo
	$(ACCELERATE_1CPU) launch/train.py --config configs/demo.yaml
	$(BIN)/python tools/export_tokenizer.py --run runs/demo --output runs/demo/release
	$(BIN)/python tools/eval_tokenizer.py --tokenizer runs/demo/release \
		--input 'data/demo/eval/{000000..000001}.tar' --out runs/demo/eval
	$(BIN)/python tools/tokenize_dataset.py --tokenizer runs/demo/release --no-progress \
		--input 'data/demo/train/{000000..000007}.tar' --output runs/demo/codes/train
	$(BIN)/python tools/tokenize_dataset.py --tokenizer runs/demo/release --no-progress \
		--input 'data/demo/eval/{000000..000001}.tar' --output runs/demo/codes/eval
	$(ACCELERATE_1CPU) launch/train_prior.py --config configs/demo_prior.yaml
	$(BIN)/python tools/sample_prior.py --prior runs/demo/prior --tokenizer runs/demo/release \
		--n 16 --out runs/demo/samples.png

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf runs/demo data/demo
