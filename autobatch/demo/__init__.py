"""The demo: a little BatchNorm U-Net learns to segment shapes, with a logical batch of 16."""
from autobatch.demo.data import shapes
from autobatch.demo.train import DemoResult, run
from autobatch.demo.unet import UNet

__all__ = ["DemoResult", "UNet", "run", "shapes"]
