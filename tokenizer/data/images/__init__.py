"""Images: file modes to 8-bit RGB, decode checks, crops and augmentation, pixel inputs."""
