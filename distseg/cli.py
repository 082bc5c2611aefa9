"""The `distseg` command line: a click group whose commands live in distseg/commands/, one module each,
loaded only when named (click's lazy-loading pattern), so `distseg shard` does not import torch and no
command module imports this one. User mistakes end as one line on stderr with exit status 2."""

from __future__ import annotations

import importlib
import signal
import sys

import click

from distseg.errors import UserError, describe_os_error, missing_extra

COMMANDS = {  # name: "module:attribute"
    "synth": "distseg.commands.data:synth",
    "shard": "distseg.commands.data:shard",
    "inspect": "distseg.commands.data:inspect",
    "train": "distseg.commands.train:train",
    "evaluate": "distseg.commands.evaluate:evaluate",
    "predict": "distseg.commands.predict:predict",
    "bench": "distseg.commands.bench:bench",
    "report": "distseg.commands.report:report",
    "experiment": "distseg.commands.experiment:experiment",
    "export": "distseg.commands.export:export",
}


class LazyGroup(click.Group):
    """A group that imports a command's module the first time the command is needed."""

    def list_commands(self, ctx):
        """Every command name, sorted."""
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        """Import and return the named command (None for an unknown name: click reports it)."""
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        try:
            return getattr(importlib.import_module(module), attr)
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
    """U-Net semantic segmentation on Cityscapes: synth, shard, train, evaluate, predict, bench."""


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
        sub = e.ctx.info_name if e.ctx and e.ctx.parent else ""
        where = f" (see distseg {sub} --help)".replace("  ", " ")
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
