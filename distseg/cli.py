"""The `distseg` command line: a click group whose commands live in distseg/commands/, one module each,
loaded only when named (click's lazy-loading pattern), so `distseg shard` does not import torch and no
command module imports this one. User mistakes end as one line on stderr with exit status 2."""

from __future__ import annotations

import importlib
import importlib.util
import signal
import sys

import click

from distseg.errors import UserError, describe_os_error, missing_extra

# name: ("module:attribute", the line `distseg --help` shows, so that listing the commands imports none of
# them; tests/test_commands.py checks each line against the command's own help)
COMMANDS = {
    "synth": ("distseg.commands.data:synth", "Write synthetic street scenes in the Cityscapes layout."),
    "shard": ("distseg.commands.data:shard", "Pack one split into WebDataset tars + manifest + DALI index."),
    "inspect": ("distseg.commands.inspect:inspect", "Print what a shard folder or a run folder holds."),
    "train": ("distseg.commands.train:train", "Train (several processes: python -m distseg.launch)."),
    "config": ("distseg.commands.config:config", "List every setting with its value and meaning."),
    "evaluate": ("distseg.commands.evaluate:evaluate", "Official Cityscapes scores of a run or results."),
    "predict": ("distseg.commands.predict:predict", "Official-format results for images or a split."),
    "export": ("distseg.commands.export:export", "Export a run's weights as ONNX or torch.export."),
    "report": ("distseg.commands.report:report", "One self-contained HTML page comparing runs."),
    "experiment": ("distseg.commands.experiment:experiment", "Run or submit a staged plan of runs."),
    "tune": ("distseg.commands.tune:tune_cmd", "Measure settings on this machine; write the fastest."),
    "bench": ("distseg.commands.bench:bench", "Throughput benchmarks as Markdown tables."),
}


NEEDS = {"report": "matplotlib"}  # a command whose module cannot import without an optional dependency


def module_available(name: str) -> bool:
    """Whether `name` would import, found without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError, AttributeError):  # ValueError: stubbed out as None in sys.modules
        return False


class LazyGroup(click.Group):
    """A group that imports a command's module the first time the command is needed."""

    def list_commands(self, ctx):
        """Every command name, in the order of the table (the order of the work)."""
        return list(COMMANDS)

    def format_commands(self, ctx, formatter):
        """The commands and their lines from the table, without importing any command module; a command
        whose optional dependency is not installed says so."""
        rows = []
        for name, (_, line) in COMMANDS.items():
            need = NEEDS.get(name)
            missing = need and not module_available(need)
            rows.append((name, f"(not installed here: {missing_extra(ImportError(name=need))})" if missing
                         else line))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def get_command(self, ctx, name):
        """Import and return the named command (None for an unknown name: click reports it)."""
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name][0].split(":")
        try:
            command = getattr(importlib.import_module(module), attr)
            command.short_help = COMMANDS[name][1]
            return command
        except ImportError as e:  # an optional dependency is not installed: the command says which
            need = missing_extra(e)
            if need is None:
                raise
            return unavailable(name, need)


def unavailable(name: str, need: str) -> click.Command:
    """A stand-in for a command whose optional dependency is missing: `distseg --help` still lists it,
    and running it prints one line naming the extra to install."""
    def run(**_):
        raise UserError(f"distseg {name} {need}")
    return click.Command(name, callback=run, help=f"(not installed here: {need})",
                         context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                           "help_option_names": []})


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="distseg")
def cli() -> None:
    """U-Net semantic segmentation on Cityscapes, from one GPU to a Slurm cluster.

    Several processes or GPUs: python -m distseg.launch --multi_gpu --num_processes N distseg/train.py
    -c CONFIG [section.key=value ...]. Settings: section.key=value or --set section.key=value with every
    command that takes them; `distseg config` lists them. `distseg COMMAND --help` for each command."""


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `distseg` script: run a command, mapping errors to one line and an exit status."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run cleanup (temp files) on TERM too
    try:
        cli.main(args=argv, prog_name="distseg", standalone_mode=False)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:
        names, ctx = [], e.ctx
        while ctx is not None and ctx.parent is not None:  # the subcommand's path: "bench train"
            names.insert(0, ctx.info_name)
            ctx = ctx.parent
        where = f" (see distseg {' '.join(names)} --help)".replace("  ", " ")
        click.echo(f"error: {e.format_message()}{where}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except OSError as e:  # unwritable output, full disk, ...: say which file, no traceback
        click.echo(f"error: {describe_os_error(e)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
