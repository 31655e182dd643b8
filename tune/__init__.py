"""Ray Tune over the training pipeline: loss-weight sweeps, sensitivity reports and ablations.

    python -m tune.sweep --config configs/sweep-tiny.yaml        # search α_t, β, λ, T
    python -m tune.sensitivity --results runs/sweep-tiny         # which of them matter
    python -m tune.ablate --config configs/ablate-tiny.yaml      # STW × DLE × pooling × seeds

Not installed into site-packages (a top-level `tune` would clash with other packages): run from the
repo root, which is also what `ray job submit --working-dir .` gives every driver and worker.

Modules: `space` (parameter ranges from SPEC §2–3 and how a point becomes a `Config`), `config`
(the harness configs: a training Config tree plus a `sweep` or `ablate` section), `objective`
(held-out evaluation → one number), `trial` (one training run that evaluates as it goes, shared by sweeps
and ablations), `runner` (the Ray Tune layer), `results` (the trials table), `importance` (fANOVA,
PED-ANOVA, Sobol, correlation ratio), `plots`.
"""
