"""distseg: U-Net semantic segmentation on Cityscapes, from one GPU to a Slurm cluster."""

__version__ = "0.1.0"
