"""MLflow: runs and their logging, the registry and its gate, lineage, credential redaction, the pyfunc model file."""
