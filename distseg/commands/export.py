"""`distseg export`: a run's weights as ONNX or a torch.export program (.pt2)."""

from __future__ import annotations

import click

from distseg.commands.options import weights_option
from distseg.errors import UserError, missing_extra
from distseg.flows.export import export_run, input_shape, run_image_size
from distseg.runs.run_dir import CHECKPOINT_HELP, find_run, load_run


@click.command()
@click.option("--run", default=None, help="run folder (runs/<name>) [default: the one holding --checkpoint]")
@click.option("--checkpoint", default="best", show_default=True, help=CHECKPOINT_HELP)
@weights_option
@click.option("--format", "fmt", required=True, type=click.Choice(["onnx", "pt2"]),
              help="onnx (onnxruntime, TensorRT, ...) or pt2 (torch.export, the successor of TorchScript)")
@click.option("--out", required=True, help="the file to write")
@click.option("--height", default=None, type=int,
              help="input height [default: the run's image height; the example size when --dynamic]")
@click.option("--width", default=None, type=int,
              help="input width [default: the run's image width; the example size when --dynamic]")
@click.option("--dynamic", is_flag=True, help="any batch size, height and width")
@click.option("--argmax", is_flag=True, help="output the int64 class map instead of float32 logits")
@click.option("--input", "input_dtype", default="uint8", show_default=True,
              type=click.Choice(["uint8", "float"]),
              help="uint8 pixels 0-255, or float32 in [0, 1] (RGB, N x 3 x H x W; normalisation folded in)")
def export(run, checkpoint, weights, fmt, out, height, width, dynamic, argmax, input_dtype) -> None:
    """Export a run's weights for serving: normalisation folded in, logits or class map out. The input is
    fixed at the run's image size unless --height/--width or --dynamic (named axes batch, height, width).
    The program computes in float32 whatever the run's train.mixed_precision: the serving runtime chooses
    its own precision."""
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as e:
            raise UserError(f"--format onnx {missing_extra(e) or e}") from None
    loaded = load_run(run or find_run(checkpoint), checkpoint, weights=weights)
    size, source = run_image_size(loaded), "the run's images"
    if size is None:
        size, source = (1024, 2048), "Cityscapes' size: the run's shards do not say theirs"
    if height is not None or width is not None:
        size, source = (height or size[0], width or size[1]), "as given"
    path = export_run(loaded, fmt, out, size[0], size[1], dynamic, argmax, input_dtype)
    shape = input_shape(input_dtype == "uint8", dynamic, size)
    click.echo(f"exported {loaded.weights} to {path} ({fmt}, {path.stat().st_size / 1e6:.1f} MB); input "
               f"{shape}{'' if dynamic else f' ({source})'}")
