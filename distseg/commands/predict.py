"""`distseg predict`: official-format Cityscapes results for images, folders or a split."""

from __future__ import annotations

import click
from accelerate import PartialState

from distseg.commands.options import (
    SETTINGS_HELP,
    inputs_and_settings,
    precision_option,
    set_option,
    settings,
    weights_option,
)
from distseg.flows.predict import predict as run_predict
from distseg.runs.run_dir import CHECKPOINT_HELP


@click.command(epilog=SETTINGS_HELP)
@click.option("--run", required=True, help="run folder (runs/<name>)")
@click.option("--checkpoint", default="best", show_default=True, help=CHECKPOINT_HELP)
@click.option("--out", required=True, help="results folder: one PNG per image, nothing else")
@click.option("--root", default=None,
              help="Cityscapes root for --split [default: the run's source data, $CITYSCAPES_DATASET]")
@click.option("--split", default=None, help="predict every image of this split")
@click.option("--overlays", default=None, help="also write colour masks and overlays into this folder")
@click.option("--zip", "zip_path", default=None,
              help="also pack the results into this zip (benchmark server)")
@click.option("--alpha", default=0.5, show_default=True, help="overlay opacity")
@click.option("--batch-size", default=None, type=int, help="images per batch [default: data.val_batch_size]")
@click.option("--workers", default=2, show_default=True, help="image decoding processes")
@precision_option()
@set_option
@weights_option
@click.argument("inputs", nargs=-1)
def predict(run, checkpoint, out, root, split, overlays, zip_path, alpha, batch_size, workers, precision,
            weights, set_values, inputs) -> None:
    """Segment INPUTS (image files or folders) and/or --split (of --root, or of the run's source images)
    into official results; section.key=value arguments among INPUTS are settings.

    Label-id PNGs <city>_<seq>_<frame>_pred_labelIds.png (other names: <stem>_pred_labelIds.png), ready for
    csEvalPixelLevelSemanticLabeling or `distseg evaluate --results`. Several processes:
    python -m distseg.launch --multi_gpu --num_processes N -m distseg predict ... (each image once).
    """
    inputs, bare = inputs_and_settings(inputs)
    overrides = settings(bare, set_values)
    n = run_predict(run, tuple(inputs), out, checkpoint, root, split, overlays, zip_path, alpha, batch_size,
                    workers, precision, tuple(overrides), weights)
    if PartialState().is_main_process:
        click.echo(f"wrote {n} results to {out}" + (f", overlays to {overlays}" if overlays else "")
                   + (f", archive {zip_path}" if zip_path else ""))
