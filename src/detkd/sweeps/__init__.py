"""Ray Tune sweeps over a run's settings: teacher sequences, student resolutions, loss weights.

``space`` reads and checks ``search_spaces/*.yaml`` (no Ray); ``trial`` is the Tune
function that drives one Ray Train run per trial; ``tuner`` runs, resumes and
finishes a sweep; ``report`` writes its tables, plots and best configuration.
"""
