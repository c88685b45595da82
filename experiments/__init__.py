"""The studies behind experiments/RESULTS.md, each run from the repository root as `python -m experiments.<name>`."""
