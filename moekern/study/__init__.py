"""The placement-and-scaling study: profiling, expert co-activation, factorial designs with ANOVA, a
learned serving predictor, placement recommendations and a multi-node projection.

Like moekern.analysis, nothing here imports torch at module level (profile.py imports it inside the
functions that profile); numpy, pandas, statsmodels, scikit-learn and matplotlib load on first use.
Submodules: profile, coactivation, factorial, learned, recommend, project, report, cli.
"""
