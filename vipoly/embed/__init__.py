"""The batch embedding job's library (`python -m pipelines.embed` is its command line): inputs
(files, columns, the normalize stage), stages (prepare, embed), output (resume, side files,
duplicates). Each piece runs without a cluster."""
