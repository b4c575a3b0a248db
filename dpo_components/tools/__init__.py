"""Study tools, run from the command line: ``python -m dpo_components.tools.plot RUN_DIR`` (metric curves),
``python -m dpo_components.tools.experiments SWEEP.yaml`` (a sweep of config variants, table and plot),
``python -m dpo_components.tools.frontier`` (reward against KL per loss, the DPO paper's Figure 2 in miniature)."""
