"""The baseline is honest: it finds a planted relation and finds nothing in a random walk."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bqx.errors import BqxError
from bqx.metrics import compute
from bqx.ml.baseline import (
    MIN_BLOCKS,
    block_bootstrap_gain,
    markdown,
    run_baseline,
    scores,
    write_outputs,
)
from bqx.ml.features import SPLITS, fingerprint, pair_features, split_boundaries, write_split

WINDOWS, LAGS, H = (5, 10, 20), (1, 5), 10


def _features_dir(
    out: Path, log_price: np.ndarray, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
) -> Path:
    """A `bqx features` directory built from one synthetic pair's prices."""
    n = len(log_price)
    times = (np.datetime64("2024-07-01T00:00", "m") + np.arange(n)).astype("datetime64[us]")
    close = np.exp(log_price)
    rng = np.random.default_rng(1)
    high, low = close * (1 + 1e-5 * rng.random(n)), close * (1 - 1e-5 * rng.random(n))
    metrics = compute(times, close, windows=WINDOWS)
    embargo = H + max(WINDOWS)
    names, pf = pair_features(
        times, close, high, low, rng.integers(1, 9, n).astype(float), metrics,
        target="w10_bqx_return", horizon=H, embargo=embargo, lags=LAGS,
        boundaries=split_boundaries(times[0], times[-1], fractions),
    )  # fmt: skip
    splits, prints = {}, {}
    for code, split in enumerate(SPLITS):
        (out / split).mkdir(parents=True)
        sel = pf.labels == code
        write_split(out / split / "eurusd.parquet", "eurusd", pf, sel, names)
        splits[split] = {"rows": int(sel.sum())}
        prints[f"{split}/eurusd.parquet"] = fingerprint(out / split / "eurusd.parquet")
    manifest = {"target": "w10_bqx_return", "horizon": H, "features": names, "pairs": ["eurusd"],
                "splits": splits, "embargo_bars": embargo, "fingerprints": prints}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _random_walk(n: int, seed: int) -> np.ndarray:
    return np.log(1.08) + np.cumsum(np.random.default_rng(seed).normal(0, 1e-4, n))


def _mean_reverting(n: int, seed: int) -> np.ndarray:
    """A planted, learnable relation: the log price reverts to a fixed level (OU process),
    so how far it stands from that level now predicts the move over the next H bars."""
    eps = np.random.default_rng(seed).normal(0, 1e-4, n)
    x = np.empty(n)
    x[0] = 0.0
    for i in range(1, n):
        x[i] = 0.95 * x[i - 1] + eps[i]
    return np.log(1.08) + x


def test_a_random_walk_beats_nothing(tmp_path: Path) -> None:
    fdir = _features_dir(tmp_path / "rw", _random_walk(16_000, seed=7))
    doc, arrays = run_baseline(fdir, trees=40, n_jobs=1)
    assert doc["beats_baselines"] is False and doc["verdict"] == "nothing_beats_baselines"
    assert doc["statement"].startswith("Nothing beats the baselines") and doc["reason"]
    assert set(doc["models"]) == {"ridge", "lightgbm"}
    assert set(doc["baselines"]) == {"random", "mean"}
    for s in [*doc["models"].values(), *doc["baselines"].values()]:
        assert set(s) == {"r2", "rmse", "mae", "directional_accuracy"}
    assert doc["models"][doc["best_model"]]["r2"] < 0.02
    # files: JSON equal to the document, Markdown saying it plainly, a plot
    paths = write_outputs(doc, arrays, tmp_path / "out")
    assert json.loads(paths[0].read_text()) == json.loads(json.dumps(doc))
    assert "Nothing beats the baselines" in paths[1].read_text()
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_planted_relation_is_found(tmp_path: Path) -> None:
    fdir = _features_dir(tmp_path / "ou", _mean_reverting(16_000, seed=7))
    doc, _ = run_baseline(fdir, trees=40, n_jobs=1)
    assert doc["beats_baselines"] is True, doc["statement"]
    assert doc["verdict"] == "beats_baselines" and doc["reason"] is None
    best = doc["models"][doc["best_model"]]
    assert best["r2"] > 0.05 and best["directional_accuracy"] > 0.55
    assert best["rmse"] < doc["baselines"]["mean"]["rmse"] < doc["baselines"]["random"]["rmse"]
    for c in doc["significance"]["comparisons"][doc["best_model"]].values():
        assert c["ci95_low"] > 0


def test_scores_and_bootstrap_against_plain_formulas() -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(size=500)
    p = y * 0.5 + rng.normal(size=500)
    s = scores(y, p)
    ss_res = sum((a - b) ** 2 for a, b in zip(y, p, strict=True))
    ss_tot = sum((a - y.mean()) ** 2 for a in y)
    assert s["r2"] == pytest.approx(1 - ss_res / ss_tot, rel=1e-12)
    assert s["rmse"] == pytest.approx((ss_res / 500) ** 0.5, rel=1e-12)
    assert s["mae"] == pytest.approx(sum(abs(a - b) for a, b in zip(y, p, strict=True)) / 500)
    hits = sum((a > 0) == (b > 0) for a, b in zip(y, p, strict=True))
    assert s["directional_accuracy"] == pytest.approx(hits / 500)
    minutes = np.arange(500)
    base = np.zeros(500)
    gain = block_bootstrap_gain(y, p, base, minutes, 10)
    assert gain["blocks"] == 50
    assert gain["mse_gain"] == pytest.approx(np.mean(y**2 - (p - y) ** 2))
    assert gain["ci95_low"] <= gain["mse_gain"] <= gain["ci95_high"]
    # the same gain measured on a model that is the truth is significant
    assert block_bootstrap_gain(y, y, base, minutes, 10)["significant"] is True


def test_baseline_command_on_a_bad_directory(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{\n  oops")
    proc = subprocess.run(
        [sys.executable, "-m", "bqx.cli", "baseline", "--features", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "manifest.json: line 2" in proc.stderr


@pytest.mark.parametrize(
    "n, fractions",
    [(4_000, (0.98, 0.01, 0.01)), (4_000, (0.9, 0.05, 0.05)), (4_000, (0.8, 0.1, 0.1)),
     (16_000, (0.8, 0.1, 0.1)), (16_000, (0.6, 0.2, 0.2))],
)  # fmt: skip
def test_a_random_walk_never_beats_the_baselines_whatever_the_split(n, fractions, tmp_path):
    """A small test split left the bootstrap a few blocks, and a random walk "beat" the
    baselines one time in three: below MIN_BLOCKS blocks bqx now says it cannot tell."""
    for seed in range(6):
        fdir = _features_dir(tmp_path / str(seed), _random_walk(n, seed=seed), fractions)
        doc, _ = run_baseline(fdir, trees=20, n_jobs=1)
        assert doc["beats_baselines"] is False, (seed, doc["statement"])
        blocks = min(c["blocks"] for c in doc["significance"]["comparisons"][doc["best_model"]]
                     .values())  # fmt: skip
        if blocks < MIN_BLOCKS:
            assert doc["verdict"] == "too_little_test_data", (seed, blocks)
            assert doc["statement"].startswith("Too little test data to tell")
            assert f"{blocks} blocks" in doc["reason"] and "Too little test data" in markdown(doc)
        else:
            assert doc["verdict"] == "nothing_beats_baselines", (seed, blocks)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bqx.cli", *args], capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_a_split_file_of_another_run_or_a_missing_feature_is_one_line(tmp_path: Path) -> None:
    one = _features_dir(tmp_path / "one", _random_walk(4_000, seed=1))
    other = _features_dir(tmp_path / "other", _random_walk(4_000, seed=2))
    # a test file swapped in from another run: refused, naming the file
    shutil.copy(other / "test" / "eurusd.parquet", one / "test" / "eurusd.parquet")
    proc = _run_cli("baseline", "--features", str(one))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"{one / 'test' / 'eurusd.parquet'}: not the file that manifest.json describes" in (
        proc.stderr
    )
    # a manifest naming a feature the files lack: one line naming the file and the column
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["features"].append("w99_bqx_return")
    (other / "manifest.json").write_text(json.dumps(manifest))
    culprit = other / "train" / "eurusd.parquet"
    with pytest.raises(BqxError, match=f"^{re.escape(str(culprit))}: no column w99_bqx_return"):
        run_baseline(other, trees=20, n_jobs=1)
    # a split file that the manifest lists but is gone
    (other / "validation" / "eurusd.parquet").unlink()
    manifest["features"].pop()
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BqxError, match="validation/eurusd.parquet: missing"):
        run_baseline(other, trees=20, n_jobs=1)


def test_library_warnings_become_notes_not_output(tmp_path: Path) -> None:
    """100 copies of one feature make ridge's system ill-conditioned (scipy's LinAlgWarning):
    the output stays clean, the report says it in a line."""
    fdir = _features_dir(tmp_path / "f", _random_walk(16_000, seed=7))
    manifest = json.loads((fdir / "manifest.json").read_text())
    copies = [f"copy_{i}" for i in range(100)]
    for split in SPLITS:
        path = fdir / split / "eurusd.parquet"
        table = pq.read_table(path)
        for name in copies:
            table = table.append_column(name, table.column("w20_bqx_avg"))
        pq.write_table(table, path)
        manifest["fingerprints"][f"{split}/eurusd.parquet"] = fingerprint(path)
    manifest["features"] += copies
    (fdir / "manifest.json").write_text(json.dumps(manifest))
    proc = _run_cli("baseline", "--features", str(fdir), "--trees", "20", "--out",
                    str(tmp_path / "out"), "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr and "warn" not in proc.stderr.lower(), proc.stderr
    doc = json.loads(proc.stdout)
    assert any("nearly collinear" in note for note in doc["notes"]), doc["notes"]
    assert "Notes from the fits:" in (tmp_path / "out" / "baseline.md").read_text()
