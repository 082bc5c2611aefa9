"""`distseg config`: every setting with its value and what it means (the defaults, or a config's)."""

from __future__ import annotations

import click

from distseg.commands.options import set_option, settings
from distseg.config import load_config, settings_table


@click.command("config")
@click.option("--config", "-c", default=None, help="YAML config whose values to show [default: the defaults]")
@set_option
@click.argument("overrides", nargs=-1)
def config(config, set_values, overrides) -> None:
    """List every setting as section.key=value with its meaning: the defaults, or CONFIG with OVERRIDES
    applied (what `distseg train -c CONFIG OVERRIDES` would run with)."""
    click.echo(settings_table(load_config(config, settings(overrides, set_values))))
