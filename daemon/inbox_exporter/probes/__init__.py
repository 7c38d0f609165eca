"""One module per protocol. A probe performs steps and records what it saw (phase,
certificate); it holds no metrics and decides no categories: check.py times and classifies."""
