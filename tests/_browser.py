"""Render an HTML page to a PNG with Debian's headless chromium, for tests that look at a report."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest


def render(page: Path, png: Path, width: int = 1280, height: int = 3000) -> np.ndarray:
    """Screenshot `page` into `png`; return its grey levels [height, width]. Skips (saying why) without chromium."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium): the page was not rendered")
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={png}",
         f"--window-size={width},{height}", page.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    from PIL import Image

    with Image.open(png) as shot:
        return np.asarray(shot.convert("L"), dtype=np.float32)
