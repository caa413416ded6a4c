"""Results: the run-file schema, run files, regression gates, terminal tables, the Markdown report and its plots."""
