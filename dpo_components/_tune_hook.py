"""Make ``tune run recipes/<file>.py`` import *this* project's ``recipes/`` folder.

torchtune 0.6.1 turns ``tune run recipes/x.py`` into ``runpy.run_module("recipes.x")`` after *appending* the
working directory to ``sys.path``. Its own wheel installs a top-level ``recipes`` package in site-packages
whose ``__init__`` raises ``ModuleNotFoundError``, and site-packages comes first, so any project folder named
``recipes`` is shadowed.

This module is imported at interpreter start-up by ``dpo_recipes_tune_hook.pth`` (beside this file in the source
tree), which ``pip install`` puts in site-packages next to the package. It adds a meta-path finder that answers
only for the top-level name ``recipes``, and only when ``./recipes/__init__.py`` in the working directory carries
the marker ``dpo-recipes``; everything else (torchtune's built-in recipes run by name, other projects) is
untouched.
It imports nothing heavy: it runs in every Python process of the environment.

It also drops one log line of torchao 0.15, "Skipping import of cpp extensions due to incompatible torch
version", printed by every process that imports torchtune: torchao's prebuilt C++/CUDA kernels (FP6-LLM,
tensor-core int4 packing, Marlin sparse GEMMs, CUTLASS rowwise-scaled and MX kernels) are built for torch 2.9
and are skipped with torch 2.13; nothing these recipes use needs them (NF4/QLoRA, the low-bit AdamW optimizers,
float8 and int8 training are PyTorch code or torch's own kernels). Only that message is dropped.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys

MARKER = "dpo-recipes"


class LocalRecipesFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 (importlib protocol)
        if fullname != "recipes":
            return None
        init = os.path.join(os.getcwd(), "recipes", "__init__.py")
        try:
            with open(init, encoding="utf-8") as f:
                if MARKER not in f.read(2000):
                    return None
        except OSError:
            return None
        return importlib.util.spec_from_file_location(
            "recipes", init, submodule_search_locations=[os.path.dirname(init)]
        )


def _not_torchao_cpp_skip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Skipping import of cpp extensions due to incompatible torch version")


def install() -> None:
    if not any(isinstance(finder, LocalRecipesFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, LocalRecipesFinder())
    torchao_log = logging.getLogger("torchao")
    if _not_torchao_cpp_skip not in torchao_log.filters:
        torchao_log.addFilter(_not_torchao_cpp_skip)


install()
