"""The baselines the alpha-Renyi ensemble is compared with, each run from the repository root as `python -m baselines.<name>`."""
