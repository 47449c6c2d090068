"""Baseline models on a ``bqx features`` directory, compared honestly with chance.

Two well-known models are fitted on train: ridge regression (scikit-learn, standardised
features) and gradient-boosted trees (LightGBM, small, deterministic). Their hyper-parameters
are chosen on validation; the model with the lower validation error is "the best model", and
only then is the test split read, once. Beside them on test: a random baseline (predictions
drawn, seeded, from the training targets) and the training mean.

Significance: targets h bars apart overlap (a 60-bar target shares 59 bars with the next one),
so test rows are far from independent. The bootstrap therefore resamples whole blocks of time
(2 × embargo minutes, every pair's rows of a block together): the 95% interval of the drop in
mean squared error against each baseline. ``beats_baselines`` is true only when the best
model's interval lies above zero against both baselines.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from bqx.errors import BqxError
from bqx.extras import require
from bqx.ml.features import SPLITS

FEATURE = "bqx baseline"  # what needs the "ml" extra

RIDGE_ALPHAS: tuple[float, ...] = (0.1, 10.0, 1000.0)
GBM_LEAVES: tuple[int, ...] = (7, 31)
BOOTSTRAP_RESAMPLES = 2000


def read_manifest(features_dir: Path) -> dict[str, Any]:
    path = Path(features_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BqxError(f"{path}: not found (write it with `bqx features --out DIR`)") from None
    except json.JSONDecodeError as exc:
        raise BqxError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    for key in ("target", "horizon", "features", "splits"):
        if key not in manifest:
            raise BqxError(f"{path}: no {key!r} key (not a `bqx features` manifest?)")
    return manifest


def load_split(
    features_dir: Path,
    split: str,
    features: Sequence[str],
    max_rows: int | None,
    pairs: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X float32, y, ts int64 minutes) of one split; every k-th row when above ``max_rows``.

    Only the manifest's ``pairs`` are read, so files left by an earlier run are ignored."""
    folder = Path(features_dir) / split
    files = sorted(folder.glob("*.parquet"))
    if pairs is not None:
        files = [f for f in files if f.stem in set(pairs)]
    if not files:
        raise BqxError(f"{folder}: no Parquet files (write them with `bqx features`)")
    xs, ys, ts = [], [], []
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    stride = max(1, math.ceil(total / max_rows)) if max_rows else 1
    for f in files:
        table = pq.read_table(f, columns=[*features, "target", "ts_utc"])
        if table.num_rows == 0:
            continue
        # float32 halves the memory of the models' inputs; targets and scores stay float64
        x = np.empty(((table.num_rows + stride - 1) // stride, len(features)), np.float32)
        for j, c in enumerate(features):
            x[:, j] = table.column(c).to_numpy()[::stride]
        xs.append(x)
        ys.append(table.column("target").to_numpy()[::stride])
        t = table.column("ts_utc").to_numpy().astype("datetime64[m]").astype(np.int64)
        ts.append(t[::stride])
    if not xs:
        raise BqxError(f"{folder}: the {split} split has no rows (more data or another --split)")
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ts)


def scores(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """R², RMSE, MAE and directional accuracy (share of non-zero targets whose sign is hit)."""
    err = pred - y
    ss_res = float(np.sum(err**2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    moved = y != 0
    hits = np.sign(pred[moved]) == np.sign(y[moved])
    return {
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
        "rmse": math.sqrt(ss_res / len(y)),
        "mae": float(np.mean(np.abs(err))),
        "directional_accuracy": float(hits.mean()) if moved.any() else float("nan"),
    }


def block_bootstrap_gain(
    y: np.ndarray,
    pred: np.ndarray,
    base: np.ndarray,
    minutes: np.ndarray,
    block_minutes: int,
    *,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict[str, float]:
    """Drop in MSE (baseline − model) with a 95% block-bootstrap interval over time blocks."""
    d = (base - y) ** 2 - (pred - y) ** 2
    block = (minutes - minutes.min()) // max(1, block_minutes)
    _, ids = np.unique(block, return_inverse=True)
    nb = int(ids.max()) + 1
    sums = np.bincount(ids, weights=d, minlength=nb)
    counts = np.bincount(ids, minlength=nb).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, nb, size=(resamples, nb))
    boot = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {
        "mse_gain": float(d.mean()),
        "ci95_low": float(lo),
        "ci95_high": float(hi),
        "blocks": nb,
        "significant": bool(lo > 0),
    }


def _fit_ridge(x_tr, y_tr, x_va, y_va) -> tuple[Any, dict[str, Any], float]:
    Ridge = require("ml", "sklearn.linear_model", FEATURE).Ridge
    make_pipeline = require("ml", "sklearn.pipeline", FEATURE).make_pipeline
    StandardScaler = require("ml", "sklearn.preprocessing", FEATURE).StandardScaler

    best = None
    for alpha in RIDGE_ALPHAS:
        model = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(x_tr, y_tr)
        mse = float(np.mean((model.predict(x_va) - y_va) ** 2))
        if best is None or mse < best[2]:
            best = (model, {"alpha": alpha}, mse)
    assert best is not None
    return best


def _fit_gbm(x_tr, y_tr, x_va, y_va, *, trees: int, seed: int, n_jobs: int):
    lgb = require("ml", "lightgbm", FEATURE)

    best = None
    for leaves in GBM_LEAVES:
        model = lgb.LGBMRegressor(
            n_estimators=trees, learning_rate=0.05, num_leaves=leaves, min_child_samples=100,
            subsample=0.8, subsample_freq=1, colsample_bytree=0.8, reg_lambda=1.0,
            random_state=seed, n_jobs=n_jobs, deterministic=True, force_col_wise=True,
            verbose=-1,
        )  # fmt: skip
        # the number of trees is chosen on validation too (early stopping)
        model.fit(
            x_tr, y_tr, eval_X=(x_va,), eval_y=(y_va,),
            callbacks=[lgb.early_stopping(max(10, trees // 10), verbose=False)],
        )  # fmt: skip
        mse = float(np.mean((model.predict(x_va) - y_va) ** 2))
        params = {"num_leaves": leaves, "n_estimators": int(model.best_iteration_ or trees)}
        if best is None or mse < best[2]:
            best = (model, params, mse)
    assert best is not None
    return best


def run_baseline(
    features_dir: Path,
    *,
    seed: int = 0,
    trees: int = 300,
    n_jobs: int = 2,
    max_train_rows: int = 400_000,
    max_eval_rows: int = 200_000,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Fit, choose, evaluate once on test. Returns (the JSON document, test arrays for plots)."""
    features_dir = Path(features_dir)
    manifest = read_manifest(features_dir)
    features = list(manifest["features"])
    pairs = manifest.get("pairs")
    x_tr, y_tr, _ = load_split(features_dir, "train", features, max_train_rows, pairs)
    x_va, y_va, _ = load_split(features_dir, "validation", features, max_eval_rows, pairs)
    fitted = {
        "ridge": _fit_ridge(x_tr, y_tr, x_va, y_va),
        "lightgbm": _fit_gbm(x_tr, y_tr, x_va, y_va, trees=trees, seed=seed, n_jobs=n_jobs),
    }
    best = min(fitted, key=lambda k: fitted[k][2])  # chosen on validation, before test is read
    x_te, y_te, minutes = load_split(features_dir, "test", features, max_eval_rows, pairs)
    preds = {name: m.predict(x_te) for name, (m, _, _) in fitted.items()}
    rng = np.random.default_rng(seed)
    base = {
        "random": rng.choice(y_tr, size=len(y_te), replace=True),
        "mean": np.full(len(y_te), float(y_tr.mean())),
    }
    embargo = int(manifest.get("embargo_bars") or manifest["horizon"])
    block = 2 * embargo
    comparisons = {
        name: {
            b: block_bootstrap_gain(y_te, preds[name], base[b], minutes, block, seed=seed + 1)
            for b in base
        }
        for name in preds
    }
    beats = all(c["significant"] for c in comparisons[best].values())
    doc: dict[str, Any] = {
        "models": {name: scores(y_te, p) for name, p in preds.items()},
        "baselines": {b: scores(y_te, p) for b, p in base.items()},
        "beats_baselines": bool(beats),
        "best_model": best,
        "statement": _statement(best, beats, comparisons[best]),
        "selection": {
            name: {"params": params, "validation_mse": mse}
            for name, (_, params, mse) in fitted.items()
        },
        "significance": {
            "method": f"block bootstrap over {block}-minute blocks, {BOOTSTRAP_RESAMPLES}"
            " resamples, 95% interval of the MSE drop (baseline − model)",
            "comparisons": comparisons,
        },
        "target": manifest["target"],
        "horizon": manifest["horizon"],
        "rows": {"train": len(y_tr), "validation": len(y_va), "test": len(y_te)},
        "features": len(features),
        "seed": seed,
    }
    return doc, {"actual": y_te, "predicted": preds[best]}


def _statement(best: str, beats: bool, comp: dict[str, dict[str, float]]) -> str:
    m = comp["mean"]
    if beats:
        return (
            f"{best} beats both baselines on test: mean squared error lower than the mean"
            f" prediction by {m['mse_gain']:.3g} (95% interval {m['ci95_low']:.3g} to"
            f" {m['ci95_high']:.3g}) and lower than the random baseline."
        )
    return (
        "Nothing beats the baselines: the best model on validation"
        f" ({best}) is not significantly better than predicting the training mean or a random"
        f" draw (MSE drop against the mean {m['mse_gain']:.3g}, 95% interval"
        f" {m['ci95_low']:.3g} to {m['ci95_high']:.3g})."
    )


def markdown(doc: dict[str, Any]) -> str:
    """The result as a Markdown table and the plain statement."""
    lines = [
        f"# Baseline: {doc['target']} {doc['horizon']} bars ahead",
        "",
        f"**{doc['statement']}**",
        "",
        "On the test split ({test:,} rows; trained on {train:,}, chosen on {validation:,}):".format(
            **doc["rows"]
        ),
        "",
        "| model | R² | RMSE | MAE | directional accuracy |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = [(n, s) for n, s in doc["models"].items()]
    rows += [(f"baseline: {n}", s) for n, s in doc["baselines"].items()]
    for name, s in rows:
        mark = " (chosen)" if name == doc["best_model"] else ""
        lines.append(
            f"| {name}{mark} | {s['r2']:.4f} | {s['rmse']:.4g} | {s['mae']:.4g} |"
            f" {s['directional_accuracy']:.3f} |"
        )
    lines += ["", "MSE drop of each model against each baseline (positive = model better):", ""]
    lines += ["| model | vs | MSE drop | 95% interval | significant |", "|---|---|---:|---|---|"]
    for name, comp in doc["significance"]["comparisons"].items():
        for b, c in comp.items():
            lines.append(
                f"| {name} | {b} | {c['mse_gain']:.3g} | [{c['ci95_low']:.3g},"
                f" {c['ci95_high']:.3g}] | {'yes' if c['significant'] else 'no'} |"
            )
    lines += ["", f"Method: {doc['significance']['method']}. See docs/ml.md.", ""]
    return "\n".join(lines)


def write_outputs(doc: dict[str, Any], arrays: dict[str, np.ndarray], out: Path) -> list[Path]:
    """``baseline.json``, ``baseline.md`` and ``predicted_vs_actual.png`` into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "baseline.json", out / "baseline.md", out / "predicted_vs_actual.png"]
    for path, text in ((paths[0], json.dumps(doc, indent=2) + "\n"), (paths[1], markdown(doc))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    y, p = arrays["actual"], arrays["predicted"]
    take = np.random.default_rng(0).permutation(len(y))[:20_000]
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.scatter(y[take], p[take], s=2, alpha=0.3)
    lo, hi = float(np.min(y)), float(np.max(y))
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, label="predicted = actual")
    ax.axhline(float(np.mean(p)), color="red", lw=0.8, ls="--", label="mean prediction")
    ax.set_xlabel(f"actual {doc['target']} (+{doc['horizon']} bars)")
    ax.set_ylabel(f"predicted ({doc['best_model']})")
    ax.set_title("test split: " + ("beats baselines" if doc["beats_baselines"] else
                                   "does NOT beat the baselines"))  # fmt: skip
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(paths[2], dpi=100)
    plt.close(fig)
    return paths


__all__ = ["SPLITS", "markdown", "run_baseline", "write_outputs"]
