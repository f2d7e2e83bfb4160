"""docs/config.md is generated from fleetd.config; CI fails when the two drift apart."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen_config_doc.py"
DOC = ROOT / "docs" / "config.md"


def gen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_docs_config_md_is_up_to_date() -> None:
    """If this fails, run `python scripts/gen_config_doc.py` and commit docs/config.md."""
    result = gen("--check")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


def test_check_fails_with_a_clear_message_when_the_doc_drifts(tmp_path: Path) -> None:
    stale = tmp_path / "config.md"
    shutil.copy(DOC, stale)
    stale.write_text(stale.read_text().replace("| `vram_gib` |", "| `vram_gb` |"))
    result = gen("--check", "--output", str(stale))
    assert result.returncode == 1
    assert f"{stale} is out of date with fleetd/config.py" in result.stderr
    assert "run `python scripts/gen_config_doc.py`" in result.stderr
    assert "-| `vram_gb` |" in result.stderr  # the diff shows what changed
    assert "Traceback" not in result.stderr


def test_check_fails_when_the_doc_is_missing(tmp_path: Path) -> None:
    result = gen("--check", "--output", str(tmp_path / "config.md"))
    assert result.returncode == 1
    assert "does not exist" in result.stderr
    assert not (tmp_path / "config.md").exists()


def test_generated_doc_covers_every_table_key_and_enum_value(tmp_path: Path) -> None:
    out = tmp_path / "config.md"
    assert gen("--output", str(out)).returncode == 0
    text = out.read_text()
    assert text == DOC.read_text()
    for header in [
        "### `[daemon]`",
        "### `[engines.vllm]`",
        "### `[engines.ollama.ports]`",
        "### `[[gpus.device]]`",
        "### `[[alerts.hooks]]`",
        "### `[[simulation.gpus]]`",
        "### `[[models]]`",
        "### `[models.health]`",
    ]:
        assert header in text
    assert '| `engine` | one of `"vllm"`, `"ollama"` | **required** |' in text
    assert '`"chat"`, `"vision"`, `"code"`, `"reasoning"`, `"embeddings"`' in text
    assert "| `vram_gib` | number; > 0, ≤ 1024 | **required** |" in text
    assert "| `overhead_gib` | number; ≥ 0, ≤ 64 | `2.0` |" in text
    assert "`--gpu-memory-utilization`" in text
    assert "vram_gib + overhead_gib" in text
    assert "exits with code **2**" in text
