"""Priors over code grids (autoregressive models of a tokenizer's codes): the gated
PixelCNN (pixelcnn.py) and a decoder-only transformer (transformer.py)."""
