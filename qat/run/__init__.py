"""The job layer: what `train.py` and the `qat` command run, top to bottom, from a recipe.

    qat.run.build          the one place that turns a recipe into objects (model, data, callbacks, trainer)
    qat.run.models         models by import path, from checkpoints, teachers; the old-path alias map
    qat.run.train          train(recipe): fit, export, report, summary.json
    qat.run.export         a run's int4 file: after training, or later from a checkpoint (`qat export`)
    qat.run.evaluate       `qat eval`: the float, PTQ, QAT and int4 models of a run side by side
    qat.run.eval_sources   which models `qat eval` compares, found from a run directory or a file
    qat.run.sweep          `qat sweep`: one run per setting, a Pareto table
    qat.run.preflight      checks before a run directory exists (class count against the model's outputs)
    qat.run.progress       the stage lines and spinner of commands that take more than a few seconds

Only `qat.cli`, `train.py` and tests import this package; nothing below it does (tests/qat/test_layers.py).
Its modules are named after the jobs and are not re-exported here, so no function hides its module.
"""
