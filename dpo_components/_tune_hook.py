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

A second finder answers only for ``torchtune.models.clip._transform``, the one torchtune module that imports
torchvision at import time (and with it every Llama 3.2 Vision builder): where torchvision does not import, it
gives a stand-in whose ``CLIPImageTransform`` raises when constructed (``dpo_components.models.llama3_2_vision``
says why); where torchvision imports, torchtune's own module.

It also drops one log line of torchao 0.15, "Skipping import of cpp extensions due to incompatible torch
version", printed by every process that imports torchtune: torchao's prebuilt C++/CUDA kernels (FP6-LLM,
tensor-core int4 packing, Marlin sparse GEMMs, CUTLASS rowwise-scaled and MX kernels) are built for torch 2.9
and are skipped with torch 2.13; nothing these recipes use needs them (NF4/QLoRA, the low-bit AdamW optimizers,
float8 and int8 training are PyTorch code or torch's own kernels). Only that message is dropped.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys

MARKER = "dpo-recipes"
CLIP_TRANSFORM = "torchtune.models.clip._transform"


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


class _CLIPImageTransformWithoutTorchvision:
    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 (torchtune's signature, whatever it is)
        raise ImportError(
            "torchtune's CLIPImageTransform needs torchvision, which does not import here; the preference data "
            "builders tile images with dpo_components.vision.images.ImageTiler (transformers' "
            "MllamaImageProcessorPil: PIL and numpy)"
        )


class _StandInLoader(importlib.abc.Loader):
    def create_module(self, spec):  # noqa: ANN001, ANN201 (importlib protocol)
        return None  # the default module object

    def exec_module(self, module) -> None:  # noqa: ANN001
        module.CLIPImageTransform = _CLIPImageTransformWithoutTorchvision
        module.__doc__ = f"Stand-in from {__name__}: torchvision does not import here."


def _torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or RuntimeError from a wheel built for another torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]  # a half-imported package would fail differently on the next import
        return False
    return True


def clip_transform_stand_in() -> importlib.machinery.ModuleSpec | None:
    """The spec of the stand-in for ``torchtune.models.clip._transform``, or None where torchvision imports."""
    if _torchvision_imports():
        return None
    return importlib.machinery.ModuleSpec(CLIP_TRANSFORM, _StandInLoader())


class ClipTransformFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 (importlib protocol)
        if fullname != CLIP_TRANSFORM:
            return None
        return clip_transform_stand_in()  # None where torchvision imports: torchtune's module is found as usual


def _not_torchao_cpp_skip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Skipping import of cpp extensions due to incompatible torch version")


def install() -> None:
    for finder in (LocalRecipesFinder, ClipTransformFinder):
        if not any(isinstance(f, finder) for f in sys.meta_path):
            sys.meta_path.insert(0, finder())
    torchao_log = logging.getLogger("torchao")
    if _not_torchao_cpp_skip not in torchao_log.filters:
        torchao_log.addFilter(_not_torchao_cpp_skip)


install()
