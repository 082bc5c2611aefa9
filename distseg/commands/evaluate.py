"""`distseg evaluate`: official Cityscapes scores of a run's checkpoint, an exported model or a results
folder."""

from __future__ import annotations

import click

from distseg.commands.options import SETTINGS_HELP, precision_option, set_option, settings, weights_option
from distseg.errors import UserError
from distseg.flows.evaluate import score_checkpoint, score_export, score_results
from distseg.runs.run_dir import CHECKPOINT_HELP


@click.command(epilog=SETTINGS_HELP)
@click.option("--run", default=None, help="run folder (runs/<name>) whose weights to score")
@click.option("--checkpoint", default="best", show_default=True, help=CHECKPOINT_HELP)
@click.option("--model", default=None,
              help="score this file of `distseg export` (FILE.onnx: onnxruntime, FILE.pt2: torch.export) "
                   "instead of a run, in the precision it was exported in")
@click.option("--results", default=None, help="score this folder of result PNGs instead of a run")
@click.option("--root", default=None,
              help="Cityscapes root [default: the run's source data (not for --model), $CITYSCAPES_DATASET]")
@click.option("--split", default=None,
              help="split to score [default: the run's val split; val for --model and --results]")
@click.option("--scheme", default="trainid", show_default=True,
              help="with --results: what the PNGs hold (trainid/labelid: label ids; else class indexes)")
@click.option("--shards", default=None, help="score the images stored in these shards instead of the sources")
@click.option("--json", "json_out", default=None, help="also write every score and the confusion matrix here")
@precision_option()
@click.option("--workers", default=2, show_default=True, help="image decoding processes")
@weights_option
@set_option
@click.argument("overrides", nargs=-1)
def evaluate(run, checkpoint, model, results, root, split, scheme, shards, json_out, precision, workers,
             weights, set_values, overrides) -> None:
    """Official Cityscapes IoU and iIoU (classes and categories) of a run, an exported model or a results
    folder.

    OVERRIDES are section.key=value settings applied to the run's config, e.g. eval.mode=slide eval.flip=true
    eval.scales=[0.75,1.0,1.25] data.val_batch_size=1; for --model, to the run's inference settings the
    file records (a fixed-size graph is slid over larger images; each difference from the run's own
    evaluate is printed as a note).
    """
    overrides = settings(overrides, set_values)
    if [run, model, results].count(None) != 2:
        raise UserError("pass one of --run RUN (score its weights), --model FILE (an exported model) or "
                        "--results DIR (score result PNGs)")
    if model is not None:
        if checkpoint != "best" or weights != "auto":
            raise UserError("--checkpoint and --weights choose a run's weights; --model scores the file's")
        score_export(model, split or "val", root, shards, tuple(overrides), json_out, precision, workers)
    elif results is not None:
        if overrides or shards:
            raise UserError("--results scores files as they are: config overrides and --shards do not apply")
        score_results(results, root, split or "val", scheme, json_out)
    else:
        score_checkpoint(run, checkpoint, split, root, shards, tuple(overrides), json_out, precision, workers,
                         weights)
