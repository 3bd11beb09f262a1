"""``python -m raysr.tune`` — search loss weights and generator depth with Ray Tune, one real training per trial.

    python -m raysr.tune --space tune_spaces/esrgan.yaml --preset esrgan_x4 \\
        --set data.train=s3://bucket/shards --set run.storage=s3://bucket/runs --num-samples 16
    python -m raysr.tune --space tune_spaces/depth_psnr.yaml --preset esrgan_psnr_x4 --scheduler none

Order of events: resolve the base config (as ``raysr.train`` does) and the
search space, check every space value against the config (exit 2 on any
error, before Ray starts) -> connect to Ray -> a Tuner runs :func:`run_trial`
per trial: it builds the trial's config (base + sampled values) and fits a
TorchTrainer with its own workers, whose validation results reach Tune through
:class:`ValidationReport`; ASHA stops weak trials at validation steps -> a table
of trials with the PSNR / perceptual-distance Pareto front, ``trials.csv`` and
``best_config.yaml`` in ``<run.storage>/<search name>``.

Each trial is a complete raysr run under ``<search>/runs/<trial id>`` (checkpoints,
TensorBoard, comparison images); ``--resume`` continues an interrupted search,
and every unfinished trial resumes its training from its latest checkpoint.

Modules: :mod:`~raysr.tune.space` (the space file language and a trial's config, no Ray),
:mod:`~raysr.tune.trial` (what runs in and around a trial), :mod:`~raysr.tune.report`
(metrics, ranking, the table, ``trials.csv`` and ``best_config.yaml``, no Ray) and
:mod:`~raysr.tune.cli` (the command line, the Tuner, ``--resume``).
"""
