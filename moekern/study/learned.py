"""A small learned serving predictor: throughput and latency of a configuration, on CPU.

Features (FEATURES): model shape from the registry (hidden, expert FFN width, experts, top-k, layers,
total and active parameters), layout (tp, ep, gpus), queue depth (max_num_seqs), the effective client
concurrency (min(the client's --max-concurrency, max_num_seqs); max_num_seqs when the client set none: the
requests that can decode side by side), batch tokens (max_num_batched_tokens), eplb, the MoE backend
(one-hot over BACKENDS), the workload's predicted imbalance score (text-only, moekern.analysis.predictor) and the measured imbalance (per-step CV of the
run's gate log). Targets: output_throughput, mean_ttft_ms, mean_tpot_ms, each modelled in log space.

Per target, a RandomForestRegressor and a GradientBoostingRegressor are compared by 5-fold
cross-validated mean absolute error on the training split (75%, seeded), the better one is scored on the
held-out 25% (MAE, MAPE, R^2: the accuracy the report prints), then refitted on all rows and shipped.
Missing values: a run without model fields gets the registry model whose hf_id matches its model_id
(else mixtral); no layout means tp = ep = gpus = 1; missing CV or score gets the training median.

The shipped model (moekern/data/predictor/serving_predictor.joblib) is trained on the SYNTHETIC sample in
moekern/data/synthetic_results: it shows the pipeline works, not how real serving behaves. Its features there
vary only in backend, queue depth, batch tokens, EPLB and imbalance (one model, one GPU), so its answers
for other models or layouts are extrapolation, and `recommend` says so. Retrain on real sweeps with
`moekern recommend --retrain RESULTS_DIR`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

TARGETS = ("output_throughput", "mean_ttft_ms", "mean_tpot_ms")
BACKENDS = ("moekern", "vllm", "flashinfer")
FEATURES = ("hidden_size", "intermediate_size", "num_experts", "top_k", "num_layers", "total_params_b",
            "active_params_b", "tp", "ep", "gpus", "max_num_seqs", "concurrency", "max_num_batched_tokens", "eplb",
            *(f"backend_{b}" for b in BACKENDS), "backend_other", "predicted_score", "measured_cv")
SHIPPED = "data/predictor/serving_predictor.joblib"


def _model_spec(row: dict):
    from moekern.models import MODELS, get_model

    name = row.get("model")
    if isinstance(name, str):
        try:
            return get_model(name)
        except KeyError:
            pass
    mid = str(row.get("model_id") or name or "").lower()
    for m in MODELS.values():
        if m.hf_id.lower() == mid:
            return m
    return get_model("mixtral")


def featurize(row: dict, medians: dict | None = None) -> dict:
    """One feature dict (FEATURES) from a run/config dict (keys of collect_results or a recommend query)."""
    from moekern.models import param_counts

    spec = _model_spec(row)
    pc = param_counts(spec)
    tp, ep = int(row.get("tp") or 1), int(row.get("ep") or 1)
    layout = str(row.get("layout") or "").upper()
    gpus = int(row.get("gpus") or max(tp, ep))
    if layout and not (row.get("tp") or row.get("ep")):  # a layout name with a GPU count
        tp, ep = {"TP": (gpus, 1), "EP": (1, gpus), "HYBRID": (gpus, gpus)}.get(layout, (1, 1))
    backend = str(row.get("moe_backend") or "other")
    med = medians or {}

    def num(key, default):
        v = row.get(key)
        try:
            v = float(v)
        except (TypeError, ValueError):
            return default
        return v if math.isfinite(v) else default

    eplb = row.get("eplb")
    f = {"hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
         "num_experts": spec.num_experts, "top_k": spec.top_k, "num_layers": spec.num_layers,
         "total_params_b": pc.total / 1e9, "active_params_b": pc.active / 1e9, "tp": tp, "ep": ep, "gpus": gpus,
         "max_num_seqs": num("max_num_seqs", med.get("max_num_seqs", 64.0)),
         "concurrency": min(num("max_concurrency", math.inf), num("max_num_seqs", med.get("max_num_seqs", 64.0))),
         "max_num_batched_tokens": num("max_num_batched_tokens", med.get("max_num_batched_tokens", 8192.0)),
         "eplb": 1.0 if eplb in (True, 1, "true", "True", "1") else 0.0,
         "predicted_score": num("predicted_score", med.get("predicted_score", 0.5)),
         "measured_cv": num("measured_cv", med.get("measured_cv", 0.5))}
    for b in BACKENDS:
        f[f"backend_{b}"] = 1.0 if backend == b else 0.0
    f["backend_other"] = 0.0 if backend in BACKENDS else 1.0
    return f


@dataclass
class TargetModel:
    target: str
    kind: str  # "random_forest" | "gradient_boosting"
    estimator: object
    cv_mae: dict[str, float]  # both candidates' CV MAE (log space)
    holdout: dict[str, float]  # mae, mape, r2 on the held-out split (original units)


@dataclass
class ServingPredictor:
    models: dict[str, TargetModel]
    medians: dict[str, float]
    trained_on: str
    synthetic: bool
    n_rows: int
    feature_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    features: tuple[str, ...] = FEATURES  # the columns the estimators were fitted on, in order

    def predict(self, configs: list[dict]) -> "pd.DataFrame":  # noqa: F821
        import pandas as pd

        x = pd.DataFrame([featurize(c, self.medians) for c in configs])[list(FEATURES)].to_numpy(float)
        out = {t: np.exp(m.estimator.predict(x)) for t, m in self.models.items()}
        return pd.DataFrame(out)

    def extrapolating(self, config: dict) -> list[str]:
        """Features of `config` outside the training range (answers there are extrapolation)."""
        f = featurize(config, self.medians)
        return [k for k, (lo, hi) in self.feature_ranges.items() if not lo - 1e-9 <= f[k] <= hi + 1e-9]

    def accuracy(self) -> list[dict]:
        return [{"target": t, "model": m.kind, **m.holdout, **{f"cv_mae_log_{k}": v for k, v in m.cv_mae.items()}}
                for t, m in self.models.items()]


def training_frame(results_dir):
    """(feature DataFrame, target DataFrame) of every run under `results_dir` (imbalance attached from gate logs)."""
    import pandas as pd

    from moekern.analysis.serving import load_runs

    from moekern.study.factorial import collect_results

    df = collect_results(results_dir)
    if df.empty:
        raise ValueError(f"no bench result JSON under {str(results_dir)!r}")
    runs, _ = load_runs(results_dir)  # attaches measured_cv from the gate logs
    cv = {Path(r.path).stem: r.measured_cv for r in runs}
    df["measured_cv"] = [cv.get(rid, m) for rid, m in zip(df["run_id"], df.get("measured_cv", [None] * len(df)))]
    rows = df.to_dict("records")
    # Median fill values for missing features; a column with no value at all (a real serve run has no
    # predicted_score) fills with NaN rather than warning through np.nanmedian of an all-NaN slice.
    medians = {}
    for k in ("max_num_seqs", "max_num_batched_tokens", "predicted_score", "measured_cv"):
        if k in df:
            col = pd.to_numeric(df[k], errors="coerce").dropna()
            medians[k] = float(col.median()) if len(col) else float("nan")
    x = pd.DataFrame([featurize(r, medians) for r in rows])[list(FEATURES)]
    return x, df, medians


def train(results_dir, seed: int = 0, targets=TARGETS, n_estimators: int = 100, synthetic: bool | None = None,
          test_frac: float = 0.25) -> ServingPredictor:
    """Train one model per target (module docstring); needs >= 12 runs with the target measured."""
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
    from sklearn.metrics import mean_absolute_error, mean_absolute_percentage_error, r2_score
    from sklearn.model_selection import KFold, cross_val_score, train_test_split

    x, df, medians = training_frame(results_dir)
    models = {}
    for t in targets:
        if t not in df:
            continue
        y = np.asarray(df[t], dtype=float)
        ok = np.isfinite(y) & (y > 0)
        if ok.sum() < 12:
            continue
        xt, yt = x.to_numpy(float)[ok], np.log(y[ok])
        x_tr, x_te, y_tr, y_te = train_test_split(xt, yt, test_size=test_frac, random_state=seed)
        cands = {"random_forest": RandomForestRegressor(n_estimators=n_estimators, min_samples_leaf=2, random_state=seed),
                 "gradient_boosting": GradientBoostingRegressor(n_estimators=n_estimators, max_depth=3,
                                                                learning_rate=0.05, random_state=seed)}
        folds = KFold(n_splits=min(5, len(y_tr) // 2), shuffle=True, random_state=seed)
        cv = {k: float(-cross_val_score(m, x_tr, y_tr, cv=folds, scoring="neg_mean_absolute_error").mean())
              for k, m in cands.items()}
        best = min(cv, key=lambda k: (cv[k], k))
        est = cands[best].fit(x_tr, y_tr)
        pred, true = np.exp(est.predict(x_te)), np.exp(y_te)
        hold = {"mae": float(mean_absolute_error(true, pred)),
                "mape": float(mean_absolute_percentage_error(true, pred)),
                "r2": float(r2_score(true, pred)) if len(true) > 1 else float("nan"), "n_test": int(len(true)),
                "n_train": int(len(y_tr))}
        est = cands[best].__class__(**cands[best].get_params()).fit(xt, yt)  # refit on all rows to ship
        models[t] = TargetModel(t, best, est, cv, hold)
    if not models:
        raise ValueError(f"too few runs under {str(results_dir)!r} to train (need >= 12 per target)")
    syn = bool(df["synthetic"].any()) if synthetic is None and "synthetic" in df else bool(synthetic)
    ranges = {c: (float(x[c].min()), float(x[c].max())) for c in x.columns}
    return ServingPredictor(models, medians, str(results_dir), syn, len(df), ranges)


def save(pred: ServingPredictor, path) -> Path:
    import joblib
    import sklearn

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump({"format": "moekern.serving_predictor/1", "sklearn": sklearn.__version__, "predictor": pred}, p,
                compress=3)
    return p


def sample_results_dir() -> Path:
    """The SYNTHETIC sample (a grid of 96 runs): the real shipped sample (data/sample_results, two runs of
    one H100 session) is too small to train on."""
    return Path(str(resources.files("moekern").joinpath("data/synthetic_results")))


def load(path=None) -> tuple[ServingPredictor, str]:
    """(predictor, note). Loads `path` (default: the shipped model); when it is missing or was written by
    another scikit-learn version, retrains on the shipped SYNTHETIC sample (seconds) and says so."""
    import joblib
    import sklearn

    p = Path(path) if path else Path(str(resources.files("moekern").joinpath(SHIPPED)))
    if p.is_file():
        try:
            obj = joblib.load(p)
            fitted_on = tuple(getattr(obj.get("predictor"), "features", ()))
            if obj.get("sklearn") != sklearn.__version__:
                why = f"{p} was written by scikit-learn {obj.get('sklearn')}, this is {sklearn.__version__}"
            elif fitted_on != FEATURES:
                why = (f"{p} was fitted on other features (missing {sorted(set(FEATURES) - set(fitted_on))}, "
                       f"extra {sorted(set(fitted_on) - set(FEATURES))})")
            else:
                return obj["predictor"], f"loaded {p}"
        except Exception as exc:  # a pickle from another version can fail in many ways
            why = f"{p} could not be loaded ({type(exc).__name__}: {exc})"
    else:
        why = f"{p} does not exist"
    return train(sample_results_dir()), f"{why}: retrained on the SYNTHETIC sample"
