"""The ``train`` stage (``training.train``, run by DVC): the loop, checkpoints and resume, DDP,
and the MLflow run that registers the trained model.
"""
