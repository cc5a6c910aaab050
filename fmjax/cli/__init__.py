"""The command line's modes, one module each (`python -m fmjax.main --mode=...`; fmjax/main.py
parses the flags, resolves the config and dispatches):

  train   fmjax.train.train_and_evaluate (the training loop, then the final evaluation)
  eval    fmjax.cli.evaluate  the few-step evaluation of a checkpoint
  sample  fmjax.cli.sample    samples of a checkpoint -> WORKDIR/samples/
  steer   fmjax.cli.steer     reward-steered samples and their baseline -> WORKDIR/steer/NAME/

eval, sample and steer run the run's recorded config with only RUN_MODE_FIELDS from the
command line (fmjax.main.run_mode_config).
"""

# What the command line may change in --mode=eval, sample and steer (a dotted prefix covers its
# section): how the trained run is evaluated, sampled or steered, and where its inputs now are.
# Everything else is what the run trained, read from WORKDIR/config.json.
RUN_MODE_FIELDS = (
    'eval', 'sample', 'steer', 'seed', 'train.restore_step', 'sharding',
    'data.data_dir', 'data.worker_count', 'autoencoder', 'teacher.workdir',
)
