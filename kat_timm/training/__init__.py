"""Training support for kat-train and kat-validate: data checks, dataset readers, evaluation, checkpoints."""
