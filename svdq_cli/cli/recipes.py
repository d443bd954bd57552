"""``svdq recipes [NAME]``: list the recipes, or print one resolved."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from .common import (
    JsonOpt,
    out,
)


def recipes(
    name: Annotated[str | None, typer.Argument(help="Print this recipe resolved; omit to list them.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the recipes, or print one with every field resolved."""
    from ..run.recipe import load_recipe, recipe_names

    if name is None:
        listing = {n: load_recipe(n).model for n in recipe_names()}
        if as_json:
            print(json.dumps(listing, indent=2))
        else:
            table = Table(title="recipes")
            table.add_column("recipe")
            table.add_column("model")
            for recipe_name, model_id in listing.items():
                table.add_row(recipe_name, model_id or "(the model given: svdq quantize DIR --recipe NAME)")
            out.print(table)
        return
    resolved = load_recipe(name).to_dict()
    if as_json:
        print(json.dumps(resolved, indent=2))
    else:
        import yaml

        print(yaml.safe_dump(resolved, sort_keys=False), end="")
