"""A small learned serving predictor: throughput and latency of a configuration, on CPU.

Features (FEATURES): model shape from the registry (hidden, expert FFN width, experts, top-k, layers,
total and active parameters), layout (tp, ep, gpus), queue depth (max_num_seqs), the effective client
concurrency (min(the client's --max-concurrency, max_num_seqs); max_num_seqs when the client set none: the
requests that can decode side by side), batch tokens (max_num_batched_tokens), eplb, the MoE backend
(one-hot over BACKENDS), the workload's predicted imbalance score (text-only, moekern.analysis.datasets.predictor) and the measured imbalance (per-step CV of the
run's gate log). Targets: output_throughput, mean_ttft_ms, mean_tpot_ms, each modelled in log space.

Per target, a RandomForestRegressor and a GradientBoostingRegressor are compared by 5-fold
cross-validated mean absolute error on the training split (75%, seeded), the better one is scored on the
held-out 25% (MAE, MAPE, R^2: the accuracy the report prints), then refitted on all rows and shipped.
Missing values: a run without model fields gets the registry model whose hf_id matches its model_id
(else mixtral); no layout means tp = ep = gpus = 1; missing CV or score gets the training median.

The shipped model (moekern/data/predictor/serving_predictor.joblib) is trained on a REAL factorial: the 29
steady-state benches of benchmarks/results/factorial/h200-2026-12-06-small (one H200, vLLM 0.26, the 4-layer
Mixtral-8x7B-shaped model on dummy weights served by `vllm serve`: backend vllm/moekern x client concurrency
8/32/128 x 3 datasets x 2 reps; 7 vllm benches that JIT-compiled while measured are left out). The rows it saw are
moekern/data/predictor/training_rows.csv (`load` refits on them when the pickle does not load here). Its features
vary only in backend, concurrency, predicted score and measured CV (one model, one GPU, max_num_seqs 128;
the 4-layer model featurizes as the registry's Mixtral-8x7B), so answers for other models, layouts or queue
depths are extrapolation, and `recommend` says so. Retrain on other sweeps with
`moekern recommend --model M --retrain RESULTS_DIR` (it writes both files). The SYNTHETIC sample in
moekern/data/synthetic_results remains for tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from moekern.errors import UsageError

TARGETS = ("output_throughput", "mean_ttft_ms", "mean_tpot_ms")
BACKENDS = ("moekern", "vllm", "flashinfer")
FEATURES = ("hidden_size", "intermediate_size", "num_experts", "top_k", "num_layers", "total_params_b",
            "active_params_b", "tp", "ep", "gpus", "max_num_seqs", "concurrency", "max_num_batched_tokens", "eplb",
            *(f"backend_{b}" for b in BACKENDS), "backend_other", "predicted_score", "measured_cv")
SHIPPED = "data/predictor/serving_predictor.joblib"
TRAINING_ROWS = "data/predictor/training_rows.csv"  # the rows the shipped model was trained on
# A training table's columns: what featurize reads, the targets, and where each row came from.
TABLE_COLUMNS = ("run_id", "model", "model_id", "moe_backend", "tp", "ep", "gpus", "layout", "tensor_parallel_size",
                 "max_num_seqs", "concurrency", "max_concurrency", "max_num_batched_tokens", "eplb", "dataset",
                 "predicted_score", "measured_cv", "rep", "synthetic", "steady_state", *TARGETS)


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
    left_out: list[str] = field(default_factory=list)  # run_ids not trained on (JIT-compiled while measured)

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


def training_table(results) -> tuple["pd.DataFrame", list[str]]:  # noqa: F821
    """(one row per usable run: TABLE_COLUMNS that exist, the run_ids left out). `results` is a results
    directory (run JSONs as collect_results reads them; measured_cv attached from each run's gate log) or a
    CSV written by `table_csv` (the shipped TRAINING_ROWS). Benches that JIT-compiled kernels while measured
    (steady_state false) are left out: their numbers measure compile time."""
    import pandas as pd

    from moekern.analysis.study.factorial import collect_results, steady_rows

    src = Path(results)
    if src.is_file() and src.suffix == ".csv":
        df = pd.read_csv(src)
    else:
        from moekern.analysis.serving.metrics import load_runs

        df = collect_results(src)
        if df.empty:
            raise UsageError(f"no bench result JSON under {str(results)!r}")
        runs, _ = load_runs(src)  # attaches measured_cv from the gate logs
        cv = {Path(r.path).stem: r.measured_cv for r in runs}
        df["measured_cv"] = [cv.get(rid, m) for rid, m in zip(df["run_id"], df.get("measured_cv", [None] * len(df)))]
    df, left_out = steady_rows(df)
    if df.empty:
        raise ValueError(f"no steady-state run under {str(results)!r} ({len(left_out)} left out)")
    return df[[c for c in TABLE_COLUMNS if c in df]], left_out


def table_csv(df, path) -> Path:
    """Write a training table (training_table's rows) as CSV: what the model saw, auditable, and what
    `load` retrains on when a shipped model does not load."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(p, index=False, float_format="%.6g")
    return p


def training_frame(results, table=None):
    """(feature DataFrame, run DataFrame, fill medians) of the usable runs in `results` (training_table;
    or of `table`, a table it returned)."""
    import pandas as pd

    df = table if table is not None else training_table(results)[0]
    rows = df.to_dict("records")
    # Median fill values for missing features; a column with no value at all (max_num_batched_tokens left to
    # vLLM's default in every run) gets no median, so featurize fills its fixed default, not NaN.
    medians = {}
    for k in ("max_num_seqs", "max_num_batched_tokens", "predicted_score", "measured_cv"):
        if k in df:
            col = pd.to_numeric(df[k], errors="coerce").dropna()
            if len(col):  # a column with no value at all keeps featurize's fixed default
                medians[k] = float(col.median())
    x = pd.DataFrame([featurize(r, medians) for r in rows])[list(FEATURES)]
    return x, df, medians


def train(results_dir, seed: int = 0, targets=TARGETS, n_estimators: int = 100, synthetic: bool | None = None,
          test_frac: float = 0.25, table=None) -> ServingPredictor:
    """Train one model per target (module docstring); needs >= 12 runs with the target measured. `table`:
    training_table(results_dir)'s result when the caller has it already (its gate logs are not read again)."""
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
    from sklearn.metrics import mean_absolute_error, mean_absolute_percentage_error, r2_score
    from sklearn.model_selection import KFold, cross_val_score, train_test_split

    table, left_out = table if table is not None else training_table(results_dir)
    x, df, medians = training_frame(results_dir, table)
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
    return ServingPredictor(models, medians, str(results_dir), syn, len(df), ranges, left_out=list(left_out))


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
    another scikit-learn version, retrains (seconds) and says so: the shipped model on the rows it was
    trained on (TRAINING_ROWS), any other path on the SYNTHETIC sample."""
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
    rows = Path(str(resources.files("moekern").joinpath(TRAINING_ROWS)))
    if path is None and rows.is_file():  # the shipped model's own rows: the same model, refitted here
        return train(rows), f"{why}: retrained on the shipped training rows ({rows.name})"
    return train(sample_results_dir()), f"{why}: retrained on the SYNTHETIC sample"
