"""This project's recipes (dpo-recipes). See dpo_components/_tune_hook.py for why this file exists.

torchtune's wheel installs a top-level ``recipes`` package whose ``__init__`` raises; ``tune run recipes/x.py``
imports ``recipes.x``. The marker ``dpo-recipes`` above lets our import hook pick this folder instead.
"""
