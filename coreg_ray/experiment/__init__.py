"""Experiments: a grid of (setting, method, shots, seed) runs on Ray -> a table in the paper's layout.

    coreg-ray experiment --config configs/exp-cifar-cpu.yaml --output runs/cifar-cpu
    ray job submit --working-dir . -- python jobs/experiment.py --config ... --output ...

Every run is one Ray task (`run_method` from `coreg_ray.methods`, the single entry point of every
method). The image tables go into the object store once; annotations are built once per setting
(they do not depend on the run's seed). The driver collects runs as they finish and, for each:
appends one JSON line to `OUTPUT/results.jsonl` (nothing is lost when the job dies; a relaunch
skips the runs recorded there with the same fingerprint and retries failed ones), logs an MLflow
child run under one parent run for the experiment, prints one progress line, and rewrites
`OUTPUT/table.md` and `OUTPUT/table.csv`. A run that raises is recorded with its error and its
cell reads `failed`; the other runs go on.

Experiment file (YAML)
----------------------

    name: cifar10-cpu                   # title of the table, MLflow parent run name
    description: free text              # optional
    data:                               # shared by every setting (a setting may override keys)
      images: data/cifar10-jpeg/train.parquet   # any load_image_table source
      test_images: data/cifar10-jpeg/test.parquet  # labelled; required
      limit: 1000                       # first N training rows (null: all)
      test_limit: 1000                  # first N test rows (null: all)
      image_size: null                  # resize on load (null: config data.image_size / native)
    settings:                           # table COLUMNS: annotation sources, exactly one kind each
      - {name: "q=0.3, η=0.3", synthetic: {q: 0.3, eta: 0.3, seed: 0}}
      - {name: simulated VLM, simulated_vlm: {templates: 8, per_class: 100,
                                              feature_fraction: 0.5, seed: 0,
                                              features: patches}}   # or pixels (default)
      - {name: CLIP ViT-B/32 (simulated),                 # the paper's annotation statistics
         paper_annotator: {like: clip-vitb32, dataset: gtsrb, seed: 0}}   # (or partial_acc,
                                        # avg_candidates, zero_shot, templates; features, seed)
      - name: CLIP ViT-B/32             # real annotation tables (coreg-ray annotate)
        annotations: ann/cifar10-train.parquet
        test_annotations: ann/cifar10-test.parquet        # needed by zero_shot
        annotator: CLIP ViT-B/32 (openai), 27 templates   # footer text (optional)
        data: {images: ..., test_images: ...}             # optional per-setting data (a dataset column)
        config: {data: {hflip: false}}                    # optional per-setting config sections
      - {name: true labels, true_labels: {}}  # every method on the TRUE labels (a ceiling column)
    methods: [true_labels, zero_shot, cc, dividemix, coreg]   # table ROWS (`all`: every
                                        # registered method); true_labels: the ceiling row
    shots: [0]                          # few-shot grid (fewshot.shots; true labels per class)
    seeds: [0, 1]                       # train.seed and fewshot.seed of each run
    config: {model: {backbone: small_cnn}, train: {epochs: 20}}   # base Config (or a YAML path)
    params: {pico: {...}}               # per-method hyper-parameters; for a Co-Reg variant,
                                        # dotted config keys applied after its preset
    resources: {num_cpus: 1, num_gpus: 0}   # per run (Ray task); memory: bytes (optional)
    parallel: null                      # at most N runs at once (null: as resources allow)
    labels: {coreg: Ours}               # row labels (default: from methods.describe)
    table: {columns: auto}              # auto | settings | shots

- Relative paths are looked up from the current directory, then from the experiment file's.
- Config precedence per run: `config` < the setting's `config` < `--set` overrides < the run's
  own keys (train.seed, fewshot.shots, fewshot.seed).
- Synthetic settings annotate the test split too (generator seed + 1) so `zero_shot` can be
  measured; a simulated VLM is fitted on the training labels and annotates train and test; a
  paper_annotator (`coreg_ray.annotate.simulated`) is calibrated on the training table to the
  paper's statistics and annotates both splits with that calibration.
  `zero_shot` does not depend on shots: it runs once per (setting, seed), with shots 0.
- The ceiling: the method `true_labels` is a row (the student trained with the warm-up loss for
  all epochs on the TRUE labels, same images, schedule and config as every other row; once per
  (setting, seed), shots 0; never bold), and the setting kind `true_labels: {}` is a column
  (every method trained on the true labels). Both need labelled training images.
- Table layout: rows = methods, columns = settings; with several `shots` and one setting the
  columns are shots ("1-shot", ...). With several shots and settings-columns, rows are
  "method k-shot" (the paper's Table I). Cells are mean ± sample std over seeds of the final
  test accuracy in percent; the best per column is bold (the ceiling row never is).
"""
from __future__ import annotations

# The package's modules, one concern each (this docstring is the file format):
#   schema   - the experiment file: Experiment, Setting, validation, paper_annotator
#   table    - the result table (pure): Table, format_table, row labels
#   tracking - MLflow: one parent run per experiment, a child run per run
#   driver   - run_experiment (Ray tasks, results.jsonl, table files) and execute_run
from coreg_ray.experiment.schema import (DATA_KEYS, KIND_KEYS, KINDS, RESOURCE_KEYS,  # noqa: F401
                                         SETTING_KEYS, SHOT_FREE, SIMULATED_KINDS,
                                         SIMULATED_NOTE, TOP_KEYS, Experiment, Setting,
                                         paper_annotator, run_key)
from coreg_ray.experiment.table import (SHORT_LABELS, Table, format_table,  # noqa: F401
                                        method_description, method_label, shot_label)
from coreg_ray.experiment.driver import (HISTORY_KEYS, build_annotations, device_name,  # noqa: F401
                                         epoch_rows, execute_run, run_experiment)
