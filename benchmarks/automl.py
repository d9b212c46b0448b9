"""AutoML: the best validation score each search reaches in a fixed wall-clock budget.

What a user of a search wants to know is how good a model they have after a given time, and
how soon they have a good enough one. One run, same 2 cores, same data, same search space,
same budget, three searches, each set up as its own documentation recommends:

* **sequential Optuna**: ``study.optimize`` in this process with TPE and Optuna's
  ``MedianPruner``, each trial a plain PyTorch loop that reports its validation accuracy
  every epoch (``trial.report`` / ``trial.should_prune``, Optuna's "Efficient Optimization
  Algorithms" tutorial, https://optuna.readthedocs.io/en/stable/tutorial/10_key_features/003_efficient_optimization_algorithms.html);
* **deepspark AutoML**: ``AutoEstimator`` on ``local[2]`` with its defaults (TPE, median
  pruner, as many trials at once as task slots), each trial a fit on the cached DataFrame;
* **Ray Tune (ASHA)**: ``tune.Tuner`` with ``OptunaSearch`` (TPE) and ``ASHAScheduler``
  (Ray Tune's recommended early-stopping scheduler, https://docs.ray.io/en/latest/tune/api/schedulers.html),
  one CPU per trial, 2 at once, on deepspark's Ray on Spark; its start-up is reported beside,
  not counted in the budget.

Data: scikit-learn's digits, each image copied 8 times with small pixel noise (a fixed seed);
the split is by original image (80/20), so no noisy copy of a validation image is trained on.
Model: 64 -> hidden -> hidden -> 10 MLP; space: hidden in [64, 512] (log), lr in
[3e-4, 3e-2] (log), dropout in [0, 0.3]; up to ``EPOCHS`` epochs per trial; same TPE seed.

Figures: each search runs for ``--budget`` seconds (no new trial after it). A trial's score
is the best validation accuracy it reported, counted when the trial finished; the curve of
the best score so far over time gives ``best_within_budget`` and ``time_to_target_s`` (the
first time the best reached ``TARGET_SCORE``, fixed here before any run; null if never).
Each search first runs one short warm-up (not counted); searches run one after another, so
the protocol's rounds are whole runs of this script (benchmarks/README.md).

Usage: python benchmarks/automl.py [--quick] [--no-ray] [--budget S]; the last line printed
is one JSON object; every run is appended to benchmarks/log.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from _common import emit_json, machine, print_table, run_logged, today

SEED = 0
EPOCHS = 20
BATCH_SIZE = 64
TARGET_SCORE = 0.97  # validation accuracy a user would call good enough here; fixed beforehand
ROUNDS = 3


def make_data(copies: int):
    """Digits copied with noise, split by original image so validation images stay unseen."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(digits.target))
    cut = int(0.8 * len(order))

    def noisy(indices):
        x = np.concatenate([digits.data[indices] / 16.0] * copies).astype(np.float32)
        x = np.clip(x + rng.normal(0, 0.05, x.shape).astype(np.float32), 0, 1)
        y = np.concatenate([digits.target[indices]] * copies).astype(np.int64)
        shuffle = rng.permutation(len(y))
        return x[shuffle], y[shuffle]

    return (*noisy(order[:cut]), *noisy(order[cut:]))


def make_model(config):
    hidden = int(config["hidden"])
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden),
        torch.nn.ReLU(),
        torch.nn.Dropout(float(config["dropout"])),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    )


def train_plain(config, data, epochs, seed, report=None):
    """One trial as a plain PyTorch loop; ``report(epoch, accuracy)`` after every epoch may
    return True to stop it (a pruner). Returns the best validation accuracy it reached."""
    train_x, train_y, val_x, val_y = (torch.tensor(a) for a in data)  # Ray hands read-only arrays
    torch.manual_seed(seed)
    model = make_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(config["lr"]))
    loss_fn = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    best = 0.0
    for epoch in range(epochs):
        model.train()
        for index in torch.randperm(len(train_y), generator=generator).split(BATCH_SIZE):
            optimizer.zero_grad()
            loss_fn(model(train_x[index]), train_y[index]).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = float((model(val_x).argmax(1) == val_y).float().mean())
        best = max(best, accuracy)
        if report is not None and report(epoch, accuracy):
            break
    return best


def space():
    import optuna

    return {
        "hidden": optuna.distributions.IntDistribution(64, 512, log=True),
        "lr": optuna.distributions.FloatDistribution(3e-4, 3e-2, log=True),
        "dropout": optuna.distributions.FloatDistribution(0.0, 0.3),
    }


def finished_scores(study, started: datetime.datetime) -> list[tuple[float, float]]:
    """(seconds from the search's start to the trial's end, the trial's best score) for every
    trial that ended, pruned ones with the best score they reported."""
    events = []
    for trial in study.get_trials(deepcopy=False):
        if trial.datetime_complete is None:
            continue
        scores = [v for v in [trial.value, *trial.intermediate_values.values()] if v is not None]
        if scores:
            seconds = (trial.datetime_complete - started).total_seconds()
            events.append((seconds, max(scores)))
    return sorted(events)


def run_sequential(data, budget_s, round_index):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    train_plain({"hidden": 64, "lr": 1e-3, "dropout": 0.0}, data, 1, SEED)  # warm-up
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=SEED),
        pruner=optuna.pruners.MedianPruner(),
        study_name=f"sequential-{round_index}",
    )

    def objective(trial):
        config = {
            "hidden": trial.suggest_int("hidden", 64, 512, log=True),
            "lr": trial.suggest_float("lr", 3e-4, 3e-2, log=True),
            "dropout": trial.suggest_float("dropout", 0.0, 0.3),
        }

        def report(epoch, accuracy):
            trial.report(accuracy, epoch)
            return trial.should_prune()

        return train_plain(config, data, EPOCHS, SEED + trial.number, report)

    started = datetime.datetime.now()
    study.optimize(objective, n_trials=10_000, timeout=budget_s)
    return finished_scores(study, started), time.perf_counter()


def run_deepspark(spark, frames, budget_s, round_index, directory):
    from deepspark.automl import AutoEstimator

    train_df, val_df = frames

    def search(name):
        return AutoEstimator.from_torch(
            make_model,
            space(),
            optimizer=lambda params, config: torch.optim.Adam(params, lr=config["lr"]),
            loss=torch.nn.CrossEntropyLoss(),
            metrics=["accuracy"],
            metric="val_accuracy",
            study_name=name,
            checkpoint_dir=os.path.join(directory, name),
            seed=SEED,
        )

    options = dict(feature_cols=["features"], label_cols=["label"], batch_size=BATCH_SIZE)
    search(f"warm-up-{round_index}").fit(
        train_df, validation_data=val_df, n_trials=2, epochs=1, **options
    )
    auto = search(f"timed-{round_index}")
    started = datetime.datetime.now()
    auto.fit(
        train_df, validation_data=val_df, n_trials=10_000, epochs=EPOCHS, timeout_s=budget_s,
        **options,
    )  # fmt: skip
    return finished_scores(auto.study_, started), time.perf_counter()


def run_ray_tune(data, budget_s, round_index, directory):
    """Returns the score events, and Ray's start-up seconds (not counted in the budget)."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    import deepspark.ray as dsray

    started = time.perf_counter()
    dsray.start(num_workers=2)
    start_s = time.perf_counter() - started
    try:
        import ray

        data_ref = ray.put(data)

        def trial(config):
            epochs = config.pop("epochs")

            def report(epoch, accuracy):
                tune.report({"accuracy": accuracy})
                return False  # ASHA stops the trial from outside

            train_plain(config, ray.get(data_ref), epochs, SEED, report)

        def tune_run(name, epochs_each, samples, budget):
            return tune.Tuner(
                tune.with_resources(
                    lambda config: trial({**config, "epochs": epochs_each}), {"cpu": 1}
                ),
                tune_config=tune.TuneConfig(
                    search_alg=OptunaSearch(
                        dict(space()), metric="accuracy", mode="max",
                        sampler=optuna.samplers.TPESampler(seed=SEED),
                    ),
                    scheduler=ASHAScheduler(
                        metric="accuracy", mode="max", max_t=epochs_each, grace_period=1
                    ),
                    num_samples=samples,
                    max_concurrent_trials=2,
                    time_budget_s=budget,
                ),
                run_config=tune.RunConfig(
                    name=name, storage_path=os.path.join(directory, "ray"), verbose=0
                ),
            ).fit()  # fmt: skip

        tune_run(f"warm-up-{round_index}", 1, 2, None)
        began = time.time()
        results = tune_run(f"timed-{round_index}", EPOCHS, 10_000, budget_s)
        events = []
        for result in results:
            history = result.metrics_dataframe
            if history is not None and len(history):
                events.append(
                    (float(history["timestamp"].max()) - began, float(history["accuracy"].max()))
                )
        return sorted(events), start_s
    finally:
        dsray.stop()


def curve_figures(events: list[tuple[float, float]], budget_s: float) -> dict[str, object]:
    """The best score within the budget, when the target was first reached, trials ended."""
    within = [(seconds, score) for seconds, score in events if seconds <= budget_s]
    best = max((score for _, score in within), default=None)
    reached = next((seconds for seconds, score in within if score >= TARGET_SCORE), None)
    return {
        "best_within_budget": round(best, 4) if best is not None else None,
        "time_to_target_s": round(reached, 1) if reached is not None else None,
        "trials_ended_within_budget": len(within),
    }


def summary(rounds: list[dict]) -> dict[str, object]:
    """Median and range of each figure over the rounds (a never-reached target counts as
    the budget's end, so the median says so when most rounds missed it)."""
    out: dict[str, object] = {"rounds": rounds}
    for key in ("best_within_budget", "time_to_target_s", "trials_ended_within_budget"):
        values = [r[key] for r in rounds if r[key] is not None]
        out[f"{key}_median"] = round(statistics.median(values), 4) if values else None
        out[f"{key}_range"] = [min(values), max(values)] if values else None
    out["target_reached_rounds"] = sum(r["time_to_target_s"] is not None for r in rounds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller data, a shorter budget")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Tune path")
    parser.add_argument("--budget", type=float, help="seconds per search (quick 45, else 240)")
    args = parser.parse_args()
    copies = 2 if args.quick else 8
    budget_s = args.budget or (45.0 if args.quick else 240.0)

    import pandas as pd

    import deepspark as ds

    load_before = os.getloadavg()[0]
    data = make_data(copies)
    paths = ["sequential", "deepspark"] + ([] if args.no_ray else ["ray_tune_asha"])
    events: dict[str, list[dict]] = {path: [] for path in paths}
    ray_start: list[float] = []
    with tempfile.TemporaryDirectory() as directory:
        spark = ds.init_context(cores=2)
        spark.sparkContext.setLogLevel("ERROR")

        def frame(x, y):
            pdf = pd.DataFrame({"features": list(x), "label": y})
            return spark.createDataFrame(pdf, "features array<float>, label long").repartition(2)

        frames = (frame(data[0], data[1]), frame(data[2], data[3]))
        for cached in frames:
            ds.cache(cached)
        for round_index in range(ROUNDS):
            shift = round_index % len(paths)
            for path in paths[shift:] + paths[:shift]:
                if path == "sequential":
                    found, _ = run_sequential(data, budget_s, round_index)
                elif path == "deepspark":
                    found, _ = run_deepspark(spark, frames, budget_s, round_index, directory)
                else:
                    found, start_s = run_ray_tune(data, budget_s, round_index, directory)
                    ray_start.append(round(start_s, 1))
                events[path].append(curve_figures(found, budget_s))
        ds.stop_context()
    result: dict[str, object] = {
        "benchmark": "automl",
        "date": today(),
        "machine": machine(),
        "quick": args.quick,
        "train_rows": len(data[1]),
        "validation_rows": len(data[3]),
        "max_epochs": EPOCHS,
        "budget_s": budget_s,
        "target_score": TARGET_SCORE,
        "rounds": ROUNDS,
        "load_average_1m_before": round(load_before, 2),
    }
    for path in paths:
        result[path] = summary(events[path])
    if ray_start:
        result["ray_start_s"] = ray_start
    result["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    rows = [
        (path, result[path]["best_within_budget_median"], result[path]["time_to_target_s_median"],
         f"{result[path]['target_reached_rounds']}/{ROUNDS}",
         result[path]["trials_ended_within_budget_median"])
        for path in paths
    ]  # fmt: skip
    print_table(
        ("search", "best in budget (median)", "s to target (median)", "reached", "trials"), rows
    )
    emit_json(result)


if __name__ == "__main__":
    run_logged("automl", main)
