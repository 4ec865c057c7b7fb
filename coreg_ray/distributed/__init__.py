"""Ray Train / Ray Tune wiring and MLflow tracking (optional dependencies, imported lazily)."""
