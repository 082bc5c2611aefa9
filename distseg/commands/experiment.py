"""`distseg experiment`: run (or submit to Slurm) a staged plan such as configs/experiments/seed.yaml."""

from __future__ import annotations

import sys

import click

from distseg.commands.options import SETTINGS_HELP, set_option, settings
from distseg.reporting.experiment import StageFailed, compare, ensure_shards, load_plan, run_plan, submit


@click.command(epilog=SETTINGS_HELP)
@click.argument("plan")
@click.argument("overrides", nargs=-1)
@set_option
@click.option("--procs", default=1, show_default=True, help="training processes per stage (accelerate "
                                                            "launch)")
@click.option("--seeds", default=None, help="run every stage once per seed, e.g. 0,1,2 (replaces the plan's "
                                             "seeds:); the table gives mean ± std and a t-test verdict")
@click.option("--report/--no-report", default=True, show_default=True, help="write <output_dir>/report.html")
@click.option("--submit", "to_slurm", is_flag=True, help="submit the stages to Slurm as dependent jobs")
@click.option("--sbatch", "sbatch_args", multiple=True, help="with --submit: an sbatch option for every job")
@click.option("--shard-only", is_flag=True, help="only make the plan's shards (the Slurm shard job)")
@click.option("--compare-only", is_flag=True, help="only print and save the comparison (the last Slurm job)")
def experiment(plan, overrides, set_values, procs, seeds, report, to_slurm, sbatch_args, shard_only,
               compare_only) -> None:
    """Run the stages of PLAN in order (with --seeds, each once per seed): finished runs are skipped, a
    half-done one resumes; then a table compares the plan's `compare` stages (best val score, its epoch,
    score per epoch; with seeds, mean ± std over the seeds and Welch's t-test against the first). OVERRIDES
    (section.key=value) apply to every stage."""
    overrides = settings(overrides, set_values)
    if shard_only:
        ensure_shards(load_plan(plan), click.echo)
    elif compare_only:
        compare(load_plan(plan, seeds), report, click.echo)
    elif to_slurm:
        submit(plan, tuple(overrides), tuple(sbatch_args), click.echo, seeds)
    else:
        try:
            run_plan(plan, tuple(overrides), procs, report, click.echo, seeds)
        except StageFailed as e:  # the stage printed its own error; pass its exit status through
            click.echo(f"error: {e}", err=True)
            sys.exit(e.code)
