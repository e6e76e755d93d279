"""Clusters: Ray Jobs submission of pipelines and runs, and Kubeflow Pipelines compilation."""
