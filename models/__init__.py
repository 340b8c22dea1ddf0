"""The model registry, as data: one YAML file per named model (installed as htsep.registry)."""
