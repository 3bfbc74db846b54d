"""tunnelhub: reverse-SSH proxy hubs for Databricks, generated from one hub spec."""

__version__ = "0.1.0"
