"""A residual CNN on 8x8 digit images as a Tandem task (entry point `resnet`)."""

from tandem_example_resnet.task import Block, ResNet, ResNetTask

__all__ = ["Block", "ResNet", "ResNetTask"]
__version__ = "1.0.0"
