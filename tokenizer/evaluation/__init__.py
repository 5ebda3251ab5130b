"""Evaluation: reconstruction metrics (PSNR, SSIM), held-out evaluation, image grids."""
