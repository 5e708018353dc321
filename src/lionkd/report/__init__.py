"""Reports of a finished run (`lionkd report`): a self-contained HTML page and Markdown built from what
the run left behind (its store, training folders and evaluation results). The command builds them
after a run returns; no pipeline imports this package except for the `eval.md` tables.
"""
