"""Finding lpips' v0.1 VGG heads (vgg.pth, 7 KB) inside an installed package.

torchmetrics and lpips both ship the file in their wheels (byte-identical). Their modules
import torchvision, which does not import beside every torch build, so the file is found
by the package's location alone: `importlib.util.find_spec` on a top-level name reads the
path without running the package's code.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# (package, the file's path inside it), in the order they are tried.
INSTALLED_HEADS: tuple[tuple[str, str], ...] = (
    ("torchmetrics", "functional/image/lpips_models/vgg.pth"),
    ("lpips", "weights/v0.1/vgg.pth"),
)


def installed_heads() -> Path | None:
    """The heads file of the first installed package that has one, else None."""
    for package, relative in INSTALLED_HEADS:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):  # a broken install is as good as none
            continue
        for root in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(root) / relative
            if candidate.is_file():
                return candidate
    return None
