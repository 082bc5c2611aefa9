"""`distseg tune`: the fastest settings for this machine, measured (distseg/bench/tune.py), written as a
config."""

from __future__ import annotations

import click

from distseg.bench.tune import MIN_STEPS, SEARCHES, Asked, process_age, tune
from distseg.commands.options import SETTINGS_HELP, set_option, settings
from distseg.units import parse_duration


@click.command(context_settings={"ignore_unknown_options": True}, epilog=SETTINGS_HELP)
@click.option("--config", "-c", default=None, help="training config (its shards are read)")
@click.option("--budget", default="10m", show_default=True,
              help="time for the whole search, e.g. 90s, 10m, 1h (kept within 10%)")
@click.option("--out", default="tuned.yaml", show_default=True,
              help="the config plus the chosen settings, for distseg train -c")
@click.option("--procs", default=1, show_default=True,
              help="processes per trial (python -m distseg.launch), as the runs will train")
@click.option("--search", "searches", default=",".join(SEARCHES), show_default=True,
              help="which settings that leave the training math unchanged to search, comma-separated, of "
                   f"{', '.join(SEARCHES)} ('' for none)")
@click.option("--decode", is_flag=True, help="also data.decode cpu | gpu: the decoded pixels differ slightly")
@click.option("--dali", is_flag=True,
              help="also data.loader=dali (when DALI is installed and the config allows it): its own sample "
                   "order and random draws, no resume on another process count")
@click.option("--batch-split", is_flag=True,
              help="also data.batch_size x train.grad_accum at the same global batch: a smaller micro-batch "
                   "changes BatchNorm's statistics and the Dice term (refused with model.norm=batch or "
                   "loss.dice > 0)")
@click.option("--batch-split-anyway", is_flag=True, help="--batch-split even with BatchNorm or Dice")
@click.option("--try", "tries", multiple=True, metavar="SECTION.KEY=VALUE",
              help="also try this setting on top of the best so far (repeatable; it may change the math)")
@click.option("--warmup", default=3, show_default=True, help="untimed steps first in every trial")
@click.option("--steps", default=100, show_default=True,
              help="a trial's timed window ends after this many steps, or once its share of the budget is "
                   "spent (the same for every trial)")
@click.option("--min-steps", default=MIN_STEPS, show_default=True,
              help="but not before this many steps (at most --steps), whatever its share of the budget")
@set_option
@click.argument("overrides", nargs=-1)
def tune_cmd(config, budget, out, procs, searches, decode, dali, batch_split, batch_split_anyway, tries,
             warmup, steps, min_steps, set_values, overrides) -> None:
    """Measure the real loader and training step under several settings, each trial in its own process and
    throwaway run folder; print every trial and the choice, and write the config plus the fastest settings
    (by default only those that leave the training math unchanged: data.num_workers, model.channels_last,
    model.compile). OVERRIDES: config settings, kept in the output."""
    asked = Asked(searches=[s for s in searches.split(",") if s], decode=decode, dali=dali,
                  batch_split=batch_split or batch_split_anyway, batch_split_anyway=batch_split_anyway,
                  tries=list(tries), warmup=max(0, warmup), steps=max(1, steps),
                  min_steps=max(1, min(min_steps, steps)))
    tune(config, list(settings(overrides, set_values)), parse_duration(budget, "--budget"), out, procs, asked,
         log=click.echo, spent=process_age())
