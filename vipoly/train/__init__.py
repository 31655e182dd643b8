"""Training: the per-worker loop and the pieces it is made of (optimizer groups, phases, monitoring,
checkpoint state). `pipelines/train.py` is only the Ray driver around `loop.train_loop_per_worker`."""
