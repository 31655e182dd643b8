"""Ray job entrypoints: run as `python -m pipelines.<name>` from the repo root."""
