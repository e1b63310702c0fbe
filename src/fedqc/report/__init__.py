"""Tables, plots (matplotlib, Agg) and the self-contained HTML report of a bench run."""
