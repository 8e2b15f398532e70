"""WHAT happened: tidy results tables, Plotly figures and dashboards."""
