"""The soak script runs and reports resident memory growth (the 300-completion run is not part of the suite)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_soak_script_runs(tiny_ckpt, tmp_path):
    out = tmp_path / "soak.json"
    subprocess.run(
        [sys.executable, "-m", "llama.soak", "--ckpt_dir", str(tiny_ckpt), "--completions", "6", "--warmup", "2",
         "--max_gen_len", "9", "--max_growth", "1.0", "--out", str(out)],
        cwd=ROOT, check=True, timeout=300,
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["completions"] == 6 and result["rss_after_warmup_mib"] > 0 and -1 < result["rss_growth"] < 1.0
