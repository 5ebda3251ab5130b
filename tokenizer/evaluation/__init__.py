"""Evaluation: reconstruction metrics (PSNR, SSIM), held-out evaluation during training
(evaluate.py), and the report of tools/eval_tokenizer.py: per-image scoring across ranks
(reader.py, scoring.py), LPIPS and the FID Inception-v3 from files (networks.py,
inception.py), the Fréchet distance (fid.py), the code-frequency plot (usage_plot.py) and
the report files (report.py); image grids."""
