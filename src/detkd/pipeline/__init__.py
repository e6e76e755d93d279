"""Pipelines: the spec schema, its DAG of steps, the runner, one step in its own process, step events."""
