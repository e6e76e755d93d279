"""One training run: the run plan, the meta-device build, the plain-torch loop, evaluation, the Ray Train launcher."""
