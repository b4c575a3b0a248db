"""Study tools, run from the command line in a checkout (the studies run ``recipes/`` with ``recipe_configs/``):

    python -m dpo_components.tools.plot RUN_DIR                 metric curves of a run (any output_dir)
    python -m dpo_components.tools.experiments SWEEP.yaml       a sweep of config variants: table and plot
    python -m dpo_components.tools.frontier                     reward against KL per loss (the DPO paper's Fig. 2)
    python -m dpo_components.tools.demo_seeds                   the demo over SFT and DPO seeds
"""
