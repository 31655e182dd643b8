"""The data layer: canonical schema, validation, converters, prepare, synthetic data, exact-ratio mix,
collation. Submodules are imported where used (Ray workers import only what a stage needs)."""
