"""Entry points for `deploykit compress --model tests.compress_models:NAME` in the CLI tests."""
from deploykit.examples import ResNet


def tiny_resnet():
    return ResNet((8, 16, 24), (1, 1, 1), 10)


def not_a_module():
    return 42


def needs_arguments(width):
    return ResNet((width,), (1,), 10)
