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
model's interval lies above zero against both baselines, and only when the test split holds
enough blocks and rows for an interval to mean something: with a handful of blocks a
bootstrap interval is as wide as chance makes it, so below ``MIN_BLOCKS`` blocks (or
``MIN_TEST_ROWS`` rows) the verdict is "too little test data to tell".

Warnings of the libraries (an ill-conditioned ridge fit, say) never reach the output: they
are recorded and become notes of the report.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from bqx.errors import BqxError
from bqx.extras import require
from bqx.ml.features import SPLITS, fingerprint
from bqx.ops.outdir import write_text_atomic

FEATURE = "bqx baseline"  # what needs the "ml" extra

RIDGE_ALPHAS: tuple[float, ...] = (0.1, 10.0, 1000.0)
GBM_LEAVES: tuple[int, ...] = (7, 31)
BOOTSTRAP_RESAMPLES = 2000
# the least test data a significance statement is made on: fewer blocks leave the bootstrap
# too few distinct resamples to tell a model from chance (with 2 blocks, a random walk
# "beats" the baselines about one time in four)
MIN_BLOCKS = 30
MIN_TEST_ROWS = 1000

ProgressFn = Callable[..., None]  # progress(label, done, total, rows=…)
OUT_FILES = "baseline.json, baseline.md and predicted_vs_actual.png"  # what `out` receives


def read_manifest(features_dir: Path) -> dict[str, Any]:
    path = Path(features_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BqxError(f"{path}: not found (write it with `bqx features --out DIR`)") from None
    except json.JSONDecodeError as exc:
        raise BqxError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(manifest, dict):
        raise BqxError(f"{path}: not a `bqx features` manifest (a JSON object is expected)")
    for key in ("target", "horizon", "features", "splits"):
        if key not in manifest:
            raise BqxError(f"{path}: no {key!r} key (not a `bqx features` manifest?)")
    features = manifest["features"]
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise BqxError(f"{path}: 'features' is not a list of column names")
    return manifest


def split_files(
    features_dir: Path, split: str, manifest: dict[str, Any], columns: Sequence[str]
) -> list[Path]:
    """The split's files that the manifest describes, checked before any is read: each is
    there, holds the columns the manifest names, and (when the manifest records fingerprints)
    is the very file ``bqx features`` wrote."""
    folder = Path(features_dir) / split
    pairs = manifest.get("pairs")
    if pairs is None:  # a manifest without its pairs: every file of the folder
        files = sorted(folder.glob("*.parquet"))
    else:
        files = [folder / f"{p}.parquet" for p in pairs]
    if not files:
        raise BqxError(f"{folder}: no Parquet files (write them with `bqx features`)")
    prints = manifest.get("fingerprints") or {}
    for f in files:
        if not f.is_file():
            raise BqxError(f"{f}: missing, though manifest.json lists its pair: write the"
                           " directory again with `bqx features`")  # fmt: skip
        recorded = prints.get(f"{split}/{f.name}")
        if prints and recorded != fingerprint(f):
            raise BqxError(
                f"{f}: not the file that manifest.json describes (its fingerprint differs:"
                " written by another `bqx features` run?): write the directory again with"
                " `bqx features`"
            )
        try:
            have = set(pq.ParquetFile(f).schema_arrow.names)
        except Exception as exc:  # pyarrow's errors: not Parquet, truncated
            raise BqxError(f"{f}: not a readable Parquet file ({exc})") from None
        missing = [c for c in columns if c not in have]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5
                                               else "")  # fmt: skip
            raise BqxError(f"{f}: no column {shown}, which manifest.json names (a manifest"
                           " of another run?)")  # fmt: skip
    return files


def checked_files(features_dir: Path, manifest: dict[str, Any]) -> dict[str, list[Path]]:
    """Every split's files, all checked (``split_files``) before any is read: a file swapped
    in from another run is refused before minutes of fitting, not after."""
    columns = [*manifest["features"], "target", "ts_utc"]
    return {s: split_files(features_dir, s, manifest, columns) for s in SPLITS}


def load_split(
    features_dir: Path,
    split: str,
    manifest: dict[str, Any],
    max_rows: int | None,
    files: Sequence[Path] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X float32, y, ts int64 minutes) of one split; every k-th row when above ``max_rows``.

    Only the manifest's files are read (files left by an earlier run are ignored), each
    checked first (``split_files``) unless ``files`` were checked already."""
    features = list(manifest["features"])
    folder = Path(features_dir) / split
    if files is None:
        files = split_files(features_dir, split, manifest, [*features, "target", "ts_utc"])
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
        raise BqxError(
            f"{folder}: the {split} split has no rows (more data, or other split fractions)"
        )
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


class Notes:
    """Warnings raised by the libraries while fitting, kept for the report instead of leaking
    into the output: ``with notes.catch("ridge α=0.1"): …``."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    @contextmanager
    def catch(self, where: str) -> Iterator[None]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for w in caught:
            line = f"{where}: {_explain(w.category, str(w.message))}"
            if line not in self.lines:
                self.lines.append(line)


def _explain(category: type[Warning], message: str) -> str:
    first = message.strip().splitlines()[0] if message.strip() else category.__name__
    if category.__name__ == "LinAlgWarning":
        return (
            "the features are nearly collinear (an ill-conditioned matrix), so the fit is less"
            f" exact; its validation score still counts ({first})"
        )
    return f"{category.__name__}: {first}"


def _fit_ridge(
    x_tr, y_tr, x_va, y_va, notes: Notes | None = None, progress: ProgressFn | None = None
):  # fmt: skip
    notes = notes or Notes()
    Ridge = require("ml", "sklearn.linear_model", FEATURE).Ridge
    make_pipeline = require("ml", "sklearn.pipeline", FEATURE).make_pipeline
    StandardScaler = require("ml", "sklearn.preprocessing", FEATURE).StandardScaler

    best = None
    for i, alpha in enumerate(RIDGE_ALPHAS):
        if progress is not None:
            progress("ridge", i, len(RIDGE_ALPHAS))
        with notes.catch(f"ridge (alpha {alpha:g})"):
            model = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(x_tr, y_tr)
            mse = float(np.mean((model.predict(x_va) - y_va) ** 2))
        if best is None or mse < best[2]:
            best = (model, {"alpha": alpha}, mse)
    assert best is not None
    return best


def _fit_gbm(
    x_tr, y_tr, x_va, y_va, *, trees: int, seed: int, n_jobs: int, notes: Notes | None = None,
    progress: ProgressFn | None = None,
):  # fmt: skip
    notes = notes or Notes()
    lgb = require("ml", "lightgbm", FEATURE)

    best = None
    for i, leaves in enumerate(GBM_LEAVES):
        model = lgb.LGBMRegressor(
            n_estimators=trees, learning_rate=0.05, num_leaves=leaves, min_child_samples=100,
            subsample=0.8, subsample_freq=1, colsample_bytree=0.8, reg_lambda=1.0,
            random_state=seed, n_jobs=n_jobs, deterministic=True, force_col_wise=True,
            verbose=-1,
        )  # fmt: skip
        callbacks = [lgb.early_stopping(max(10, trees // 10), verbose=False)]
        if progress is not None:
            callbacks.append(_rounds(progress, i * trees, trees * len(GBM_LEAVES)))
        # the number of trees is chosen on validation too (early stopping)
        with notes.catch(f"lightgbm ({leaves} leaves)"):
            model.fit(x_tr, y_tr, eval_X=(x_va,), eval_y=(y_va,), callbacks=callbacks)
            mse = float(np.mean((model.predict(x_va) - y_va) ** 2))
        params = {"num_leaves": leaves, "n_estimators": int(model.best_iteration_ or trees)}
        if best is None or mse < best[2]:
            best = (model, params, mse)
    assert best is not None
    return best


def _rounds(progress: ProgressFn, before: int, total: int) -> Callable[[Any], None]:
    """A LightGBM callback that reports boosting rounds as progress."""

    def report(env: Any) -> None:
        if env.iteration % 10 == 0:
            progress("lightgbm", before + env.iteration, total)

    return report


def verdict(
    comparisons: dict[str, dict[str, Any]], rows: int, block: int
) -> tuple[str, str | None]:
    """(``beats_baselines`` | ``nothing_beats_baselines`` | ``too_little_test_data``, the
    reason when the model does not beat the baselines) for the chosen model's comparisons."""
    blocks = min(int(c["blocks"]) for c in comparisons.values())
    if blocks < MIN_BLOCKS or rows < MIN_TEST_ROWS:
        return "too_little_test_data", (
            f"too little test data to tell: {rows:,} rows in {blocks} blocks of {block}"
            f" minutes, where the significance test needs at least {MIN_BLOCKS} blocks and"
            f" {MIN_TEST_ROWS:,} rows (more months, or a larger test fraction)"
        )
    if all(c["significant"] for c in comparisons.values()):
        return "beats_baselines", None
    return "nothing_beats_baselines", (
        "the chosen model's 95% interval of the drop in squared error does not lie above zero"
        " against both baselines"
    )


def run_baseline(
    features_dir: Path,
    *,
    seed: int = 0,
    trees: int = 300,
    n_jobs: int = 2,
    max_train_rows: int = 400_000,
    max_eval_rows: int = 200_000,
    progress: ProgressFn | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Fit, choose, evaluate once on test. Returns (the JSON document, test arrays for plots).

    ``progress(label, done, total, rows=…)`` is called as the stages go (reading, ridge,
    lightgbm rounds, bootstrap)."""
    features_dir = Path(features_dir)
    manifest = read_manifest(features_dir)
    features = list(manifest["features"])
    notes = Notes()
    if progress is not None:
        progress("reading", 0, 3)
    files = checked_files(features_dir, manifest)
    x_tr, y_tr, _ = load_split(features_dir, "train", manifest, max_train_rows, files["train"])
    x_va, y_va, _ = load_split(features_dir, "validation", manifest, max_eval_rows,
                               files["validation"])  # fmt: skip
    fitted = {
        "ridge": _fit_ridge(x_tr, y_tr, x_va, y_va, notes, progress),
        "lightgbm": _fit_gbm(
            x_tr,
            y_tr,
            x_va,
            y_va,
            trees=trees,
            seed=seed,
            n_jobs=n_jobs,
            notes=notes,
            progress=progress,
        ),  # fmt: skip
    }
    best = min(fitted, key=lambda k: fitted[k][2])  # chosen on validation, before test is read
    x_te, y_te, minutes = load_split(features_dir, "test", manifest, max_eval_rows,
                                     files["test"])  # fmt: skip
    with notes.catch("test"):
        preds = {name: m.predict(x_te) for name, (m, _, _) in fitted.items()}
    rng = np.random.default_rng(seed)
    base = {
        "random": rng.choice(y_tr, size=len(y_te), replace=True),
        "mean": np.full(len(y_te), float(y_tr.mean())),
    }
    embargo = int(manifest.get("embargo_bars") or manifest["horizon"])
    block = 2 * embargo
    if progress is not None:
        progress("bootstrap", 0, 1)
    comparisons = {
        name: {
            b: block_bootstrap_gain(y_te, preds[name], base[b], minutes, block, seed=seed + 1)
            for b in base
        }
        for name in preds
    }
    decided, reason = verdict(comparisons[best], len(y_te), block)
    with notes.catch("scores"):
        models = {name: scores(y_te, p) for name, p in preds.items()}
        baselines = {b: scores(y_te, p) for b, p in base.items()}
    doc: dict[str, Any] = {
        "models": models,
        "baselines": baselines,
        "beats_baselines": decided == "beats_baselines",
        "verdict": decided,
        "reason": reason,
        "best_model": best,
        "statement": _statement(best, decided, comparisons[best], reason),
        "selection": {
            name: {"params": params, "validation_mse": mse}
            for name, (_, params, mse) in fitted.items()
        },
        "significance": {
            "method": f"block bootstrap over {block}-minute blocks, {BOOTSTRAP_RESAMPLES}"
            " resamples, 95% interval of the MSE drop (baseline − model)",
            "min_blocks": MIN_BLOCKS,
            "min_rows": MIN_TEST_ROWS,
            "comparisons": comparisons,
        },
        "target": manifest["target"],
        "horizon": manifest["horizon"],
        "rows": {"train": len(y_tr), "validation": len(y_va), "test": len(y_te)},
        "features": len(features),
        "seed": seed,
        "notes": notes.lines,
    }
    return doc, {"actual": y_te, "predicted": preds[best]}


def _statement(
    best: str, decided: str, comp: dict[str, dict[str, float]], reason: str | None
) -> str:
    m = comp["mean"]
    if decided == "beats_baselines":
        return (
            f"{best} beats both baselines on test: mean squared error lower than the mean"
            f" prediction by {m['mse_gain']:.3g} (95% interval {m['ci95_low']:.3g} to"
            f" {m['ci95_high']:.3g}) and lower than the random baseline."
        )
    if decided == "too_little_test_data":
        return (
            f"Too little test data to tell whether {best} beats the baselines: {reason}."
            " Nothing is claimed."
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
    if doc.get("notes"):
        lines += ["Notes from the fits:", ""]
        lines += [f"- {note}" for note in doc["notes"]]
        lines.append("")
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
        write_text_atomic(path, text)
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
