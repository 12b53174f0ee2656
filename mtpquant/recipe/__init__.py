"""Recipes: YAML files validated in full before any long step, into frozen dataclasses (schema.py); `load` reads
one (loader.py), `Checker` (checker.py) collects every problem as `FILE: field.path: problem (hint)`."""

from mtpquant.recipe.loader import load, parse
from mtpquant.recipe.schema import (
                                    TENSOR_TYPES,
                                    VARIANT_TYPES,
                                    CardSpec,
                                    EvalSpec,
                                    Expect,
                                    FitSpec,
                                    Gates,
                                    HfSource,
                                    ImatrixSpec,
                                    Recipe,
                                    Rule,
                                    SmokeSpec,
                                    Source,
                                    Variant,
)

__all__ = ["TENSOR_TYPES", "VARIANT_TYPES", "CardSpec", "EvalSpec", "Expect", "FitSpec", "Gates", "HfSource",
           "ImatrixSpec", "Recipe", "Rule", "SmokeSpec", "Source", "Variant", "load", "parse"]
