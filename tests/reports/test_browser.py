"""The HTML report in a real browser: headless Debian chromium renders it without errors.

Needs ``/usr/bin/chromium`` (install with ``.ci/install-browser``); skips without it. The
screenshot goes to ``$REFUSALBENCH_ARTIFACTS`` when set (outside the repository), else to
the test's temporary directory.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Bench

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]
WIDTH, HEIGHT = 1280, 1400

SUITE = """
    import pytest

    @pytest.mark.claim("GT-HALF", "LT-POINT")
    @pytest.mark.parametrize("model", ["tiny-a", "tiny-b"])
    def test_layers(measure, model):
        measure.model(model, "fp-" + model)
        ds = [0.4, 0.9, 1.6] if model == "tiny-a" else [0.2, 0.3, 0.45]
        measure.plot("Cohen's d by layer", "line", x=[0, 1, 2], series={"d": ds},
                     bands={"d": ([d - 0.2 for d in ds], [d + 0.2 for d in ds])},
                     hlines=[(0.5, "threshold")], xlabel="layer", ylabel="d")
        measure.check("LT-POINT", 0.01)
        measure.check("GT-HALF", ds[-1], ci=(ds[-1] - 0.2, ds[-1] + 0.2))
"""


@pytest.fixture
def artifacts(tmp_path: Path, repo_root: Path) -> Path:
    configured = os.environ.get("REFUSALBENCH_ARTIFACTS")
    if not configured:
        return tmp_path
    path = Path(configured).resolve()
    if path.is_relative_to(repo_root):
        pytest.fail(
            f"REFUSALBENCH_ARTIFACTS={configured} is inside the repository; use a path outside"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def test_report_renders_in_headless_chromium(bench: Bench, artifacts: Path, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: run .ci/install-browser to install headless chromium")
    from PIL import Image

    bench.write_tests(SUITE)
    bench.run().assert_outcomes(passed=1, failed=1)
    url = bench.html_path.as_uri()

    screenshot = artifacts / "report-screenshot.png"
    screenshot.unlink(missing_ok=True)
    shot = chromium(
        f"--screenshot={screenshot}",
        f"--window-size={WIDTH},{HEIGHT}",
        "--hide-scrollbars",
        url,
        profile=tmp_path / "profile-shot",
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert console_messages(shot.stderr) == []
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(screenshot) as image:
        assert image.size == (WIDTH, HEIGHT)
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20)
        assert colours is not None
        assert len(colours) > 50
        most_common = max(count for count, _ in colours)
        assert most_common < 0.95 * WIDTH * HEIGHT

    dom = chromium("--dump-dom", url, profile=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert console_messages(dom.stderr) == []
    assert '<table id="matrix">' in dom.stdout
    assert 'class="cell v-pass"' in dom.stdout
    assert 'class="cell v-fail"' in dom.stdout
    assert dom.stdout.count("data:image/svg+xml;base64,") == 2
