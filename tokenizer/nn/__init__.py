"""Building blocks of the models."""

from tokenizer.nn.paper import Decoder, Encoder, ResidualBlock

__all__ = ["Decoder", "Encoder", "ResidualBlock"]
