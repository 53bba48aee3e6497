"""Figures and the HTML report of a sweep, read from MLflow only: `python -m dashboards.report`."""
