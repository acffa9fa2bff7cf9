# dinoforge: `make demo` runs the whole pipeline on a generated dataset (or DATA=folder); `make test` sets up a fresh
# machine (venv, package, system packages) and runs the suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Empty: the whole suite but `gpu`, as two pytest processes side by side (tests/run_suite.sh); else one pytest run
# with these arguments.
PYTEST_ARGS ?=

.PHONY: demo demo-run demo-stages demo-summary test venv system-deps lint bench simd gpu-check clean

# ---- make demo: curate -> pretrain -> evaluate -> distill -> evaluate -> release, each stage through its command line
# Default data: a procedural 10-class dataset written by dinoforge.data.demo_images (no download), with planted
# duplicates, corrupt and tiny files and copies of val images. DATA=/path/to/images uses a folder of yours instead
# (class sub-folders give k-NN labels). SLURM=1 runs the stages as jobs on the local Slurm cluster. A second
# `make demo` skips every finished stage (make's targets are their artefacts) and resumes an interrupted one.
DATA ?=
SLURM ?=
ifeq ($(strip $(DATA)),)
DEMO ?= runs/demo/shapes
DEMO_DATA := $(DEMO)/data
DATA_READY := $(DEMO_DATA)/COMPLETE.json
POOL := $(DEMO_DATA)/pool
TRAIN := $(DEMO_DATA)/train
VAL := $(DEMO_DATA)/val
else
DEMO ?= runs/demo/$(notdir $(abspath $(DATA)))
DEMO_DATA := $(DEMO)/data
DATA_READY := $(DEMO_DATA)/splits.json
POOL := $(DEMO_DATA)/pool.txt
TRAIN := $(DEMO_DATA)/train.txt
VAL := $(DEMO_DATA)/val.txt
endif
ifeq ($(SLURM),1)
STAGE := $(PY) -m slurm submit
ON_SLURM := --profile local --wait
# where `python -m slurm local-cluster start` puts the cluster (its --root, else $DINOFORGE_SLURM_DIR, else /tmp/...)
export SLURM_CONF := $(or $(DINOFORGE_SLURM_DIR),/tmp/dinoforge-slurm-$(shell id -u))/etc/slurm.conf
else
STAGE := $(PY) -m
ON_SLURM :=
endif
CURATED := $(DEMO)/curate/demo
TEACHER := $(DEMO)/teacher
STUDENT := $(DEMO)/distill/students/vit_tiny_d2
EXPORTED := export/teacher_backbone.safetensors
# Sizes (the suite's demo test shrinks them): training steps of the teacher and the student, and the generated
# dataset's arguments (python -m dinoforge.data.demo_images --help).
DEMO_STEPS ?= 600
DISTILL_STEPS ?= 300
DEMO_WARMUP ?= 40
DEMO_DATA_ARGS ?=
DEMO_CHECKPOINT_EVERY ?= 100
# k-NN needs labels: without them (DATA without class sub-folders) each evaluation says so and is skipped.
KNN = if [ -f $(VAL) ] || [ -d $(VAL) ]; then $(STAGE) evaluation knn --config configs/demo/knn.yaml --train $(TRAIN) \
	--val $(VAL) $(1) $(ON_SLURM); else echo "k-NN skipped: no labels (see $(DEMO_DATA)/splits.json)"; fi
EVAL_OF = $$(test -f $(1)/results_knn.json && echo --eval $(1)/results_knn.json)

demo: venv demo-run

# the pipeline without the venv step; with SLURM=1 inside a local Slurm cluster that it starts and stops
demo-run:
ifeq ($(SLURM),1)
	$(PY) -m slurm local-cluster start
	$(MAKE) --no-print-directory demo-summary || { $(PY) -m slurm local-cluster stop; exit 1; }
	$(PY) -m slurm local-cluster stop
else
	$(MAKE) --no-print-directory demo-summary
endif

$(DATA_READY):
ifeq ($(strip $(DATA)),)
	$(PY) -m dinoforge.data.demo_images $(DEMO_DATA) $(DEMO_DATA_ARGS)
else
	$(PY) -m demo prepare $(DATA) --out $(DEMO_DATA)
endif

$(CURATED)/_SUCCESS.report: $(DATA_READY) configs/demo/curate.yaml
	evals=$$(if [ -e $(VAL) ]; then echo "[{path: $(VAL), name: val}]"; else echo "[]"; fi); \
	$(STAGE) curate run configs/demo/curate.yaml runs_root=$(DEMO)/curate "sources=[{path: $(POOL), name: pool}]" \
		"evals=$$evals" $(ON_SLURM)

$(TEACHER)/$(EXPORTED): $(CURATED)/_SUCCESS.report
	$(STAGE) pretrain train configs/pretrain/cpu_tiny.yaml data.dataset=$(CURATED)/shards output_dir=$(DEMO) \
		name=teacher total_steps=$(DEMO_STEPS) optim.warmup_steps=$(DEMO_WARMUP) \
		optim.freeze_last_layer_steps=$$(( $(DEMO_WARMUP) / 2 )) checkpoint_every=$(DEMO_CHECKPOINT_EVERY) $(ON_SLURM)

$(STUDENT)/$(EXPORTED): $(TEACHER)/$(EXPORTED)
	$(STAGE) pretrain distill configs/distill/cpu_tiny.yaml teacher.weights=$(TEACHER) \
		data.dataset=$(CURATED)/shards output_dir=$(DEMO) name=distill total_steps=$(DISTILL_STEPS) \
		optim.warmup_steps=$(DEMO_WARMUP) checkpoint_every=$(DEMO_CHECKPOINT_EVERY) $(ON_SLURM)

$(DEMO)/eval/teacher/results_knn.json: $(TEACHER)/$(EXPORTED)
	$(call KNN,--weights $(TEACHER) --out $(DEMO)/eval/teacher)

$(DEMO)/eval/student/results_knn.json: $(STUDENT)/$(EXPORTED)
	$(call KNN,--weights $(STUDENT) --out $(DEMO)/eval/student)

$(DEMO)/eval/random_teacher/results_knn.json: $(DATA_READY)
	$(call KNN,--weights random --out $(DEMO)/eval/random_teacher)

$(DEMO)/eval/random_student/results_knn.json: $(DATA_READY)
	$(call KNN,--weights random model.depth=2 --out $(DEMO)/eval/random_student)

$(DEMO)/eval/pixels/results_knn.json: $(DATA_READY)
	$(call KNN,--weights pixels --out $(DEMO)/eval/pixels)

$(DEMO)/release/teacher/SHA256SUMS: $(TEACHER)/$(EXPORTED) $(DEMO)/eval/teacher/results_knn.json
	$(STAGE) pretrain release $(TEACHER) --out $(DEMO)/release/teacher --onnx \
		$(call EVAL_OF,$(DEMO)/eval/teacher) $(ON_SLURM)

$(DEMO)/release/vit_tiny_d2/SHA256SUMS: $(STUDENT)/$(EXPORTED) $(DEMO)/eval/student/results_knn.json
	$(STAGE) pretrain release $(DEMO)/distill --student vit_tiny_d2 --out $(DEMO)/release/vit_tiny_d2 --onnx \
		$(call EVAL_OF,$(DEMO)/eval/student) $(ON_SLURM)

$(TEACHER)/curves.png: $(TEACHER)/$(EXPORTED)
	$(PY) -m pretrain plot $(TEACHER)

$(STUDENT)/curves.png: $(STUDENT)/$(EXPORTED)
	$(PY) -m pretrain plot $(DEMO)/distill

demo-stages: $(DEMO)/release/teacher/SHA256SUMS $(DEMO)/release/vit_tiny_d2/SHA256SUMS \
	$(DEMO)/eval/random_teacher/results_knn.json $(DEMO)/eval/random_student/results_knn.json \
	$(DEMO)/eval/pixels/results_knn.json $(TEACHER)/curves.png $(STUDENT)/curves.png

demo-summary: demo-stages
	$(PY) -m demo summary $(DEMO) --data $(DEMO_DATA) --curate $(CURATED) \
		--model "teacher=$(TEACHER),$(DEMO)/eval/teacher" \
		--model "student vit_tiny_d2, distilled=$(STUDENT),$(DEMO)/eval/student" \
		--baseline "teacher arch, random init=$(DEMO)/eval/random_teacher" \
		--baseline "student arch, random init=$(DEMO)/eval/random_student" \
		--baseline "raw pixels, 16x16=$(DEMO)/eval/pixels" \
		--release $(DEMO)/release/teacher --release $(DEMO)/release/vit_tiny_d2

test: venv system-deps
	$(VENV)/bin/ruff check .
ifeq ($(strip $(PYTEST_ARGS)),)
	bash tests/run_suite.sh $(PY)
else
	$(PY) -m pytest $(PYTEST_ARGS)
endif

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $@

# Slurm and munge back the local-cluster tests; installed only when we may (root with apt-get).
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		command -v slurmctld >/dev/null && command -v munged >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null || \
		  echo "Slurm/munge install failed: slurm-marked tests will skip"; }; \
	else echo "not root: skipping Slurm/munge install (slurm-marked tests will skip)"; fi

lint: venv
	$(VENV)/bin/ruff check .

# Every bench/bench_*.py at its default size (hours on a 2-core CPU) -> bench/results/: NAME.json, NAME.log and
# summary.md (one headline ratio a bench). BENCH=augment,sinkhorn picks some; BENCH_ARGS='augment=--images 20'
# gives flags (bench/run_all.py --help).
bench: venv
	$(PY) bench/run_all.py

# pillow-simd in place of pillow in .venv, built here (AVX2 where the CPU has it); pillow kept when the build fails.
# bash bench/install_pillow_simd.sh .venv/bin/python --restore puts pillow back.
simd: venv
	bash bench/install_pillow_simd.sh $(PY)

# One GPU, at most 8 minutes, one JSON summary (README "GPU check"); needs no venv: the GPU machine's python3, wheels/.
gpu-check:
	bash bench/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
