"""AutoML (issue #13): deepspark's AutoEstimator against sequential Optuna and Ray Tune.

One run, same 2 cores, same data, same search space, same trial budget and time limit:

* **sequential Optuna**: ``study.optimize`` in this process, one trial after another, each a
  plain PyTorch loop (torch's default threads);
* **deepspark AutoML**: ``AutoEstimator`` on ``local[2]``, 2 single-worker trials at once, each
  a distributed fit on the cached DataFrame;
* **Ray Tune on deepspark's Ray on Spark**: ``deepspark.ray.start`` (2 worker nodes, 1 CPU
  each) and ``tune.Tuner`` with Optuna's TPE through ``OptunaSearch``, 2 trials at once, each
  the same plain PyTorch loop as the sequential path.

Data: scikit-learn's digits, made 8 times larger with small pixel noise (a fixed seed), split
80/20 once; every path trains on the same rows and scores the same validation rows. Model:
64 -> hidden -> hidden -> 10 MLP; space: hidden in [64, 512] (log), lr in [3e-4, 3e-2] (log),
dropout in [0, 0.3]; TPE with the same seed; no pruning, so every trial trains every epoch
and the rate measures throughput. Each path first runs one 1-epoch warm-up trial (not
counted). Trials per hour = finished trials / the search's wall time x 3600; the best score is
the best final-epoch validation accuracy. Ray's start-up is reported beside, not counted.
The machine's own ceiling is measured in the same run: the sequential path's configs again
as plain one-thread trials, two at a time in two processes; the sequential path's seconds over
theirs is the trials/hour ratio that two concurrent trials with no engine overhead reach.
Target: deepspark >= 1.5x the trials per hour of sequential Optuna, best score not worse.

Usage: python benchmarks/automl.py [--quick] [--no-ray]; the last line printed is one JSON
object.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from _common import emit_json, machine, print_table, run_logged, today

SEED = 0


def make_data(copies: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(SEED)
    x = np.concatenate([digits.data / 16.0] * copies).astype(np.float32)
    x = np.clip(x + rng.normal(0, 0.05, x.shape).astype(np.float32), 0, 1)
    y = np.concatenate([digits.target] * copies).astype(np.int64)
    order = rng.permutation(len(y))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


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


def train_plain(config, data, epochs, batch_size, seed):
    """One trial as a plain PyTorch loop; returns the final validation accuracy."""
    train_x, train_y, val_x, val_y = (torch.tensor(a) for a in data)  # Ray hands read-only arrays
    torch.manual_seed(seed)
    model = make_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(config["lr"]))
    loss_fn = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    accuracy = 0.0
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(train_y), generator=generator).split(batch_size):
            optimizer.zero_grad()
            loss_fn(model(train_x[index]), train_y[index]).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = float((model(val_x).argmax(1) == val_y).float().mean())
    return accuracy


def one_thread_trial(config, data, epochs, batch_size, seed) -> float:
    """Seconds of one plain trial on one torch thread (run in a pool process)."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    train_plain(config, data, epochs, batch_size, seed)
    return time.perf_counter() - started


def two_at_once(configs, data, epochs, batch_size) -> float:
    """Wall seconds for `configs` as plain one-thread trials, two at a time in two processes:
    what this machine gives two concurrent trials with no engine at all."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.starmap(one_thread_trial, [(configs[0], data, 1, batch_size, SEED)] * 2)  # warm-up
        started = time.perf_counter()
        args = [(config, data, epochs, batch_size, SEED + n) for n, config in enumerate(configs)]
        pool.starmap(one_thread_trial, args, chunksize=1)
        return time.perf_counter() - started


def space():
    import optuna

    return {
        "hidden": optuna.distributions.IntDistribution(64, 512, log=True),
        "lr": optuna.distributions.FloatDistribution(3e-4, 3e-2, log=True),
        "dropout": optuna.distributions.FloatDistribution(0.0, 0.3),
    }


def run_sequential(data, n_trials, epochs, batch_size, timeout_s):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    train_plain({"hidden": 64, "lr": 1e-3, "dropout": 0.0}, data, 1, batch_size, SEED)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=SEED))

    def objective(trial):
        config = {
            "hidden": trial.suggest_int("hidden", 64, 512, log=True),
            "lr": trial.suggest_float("lr", 3e-4, 3e-2, log=True),
            "dropout": trial.suggest_float("dropout", 0.0, 0.3),
        }
        return train_plain(config, data, epochs, batch_size, SEED + trial.number)

    started = time.perf_counter()
    study.optimize(objective, n_trials=n_trials, timeout=timeout_s)
    seconds = time.perf_counter() - started
    hidden = [t.params["hidden"] for t in study.trials]
    SEQUENTIAL_CONFIGS[:] = [dict(t.params) for t in study.trials]
    busy = [(t.datetime_complete - t.datetime_start).total_seconds() for t in study.trials]
    return len(study.trials), seconds, study.best_value, hidden, busy


SEQUENTIAL_CONFIGS: list[dict] = []  # what the sequential path trained, for the ceiling


def run_deepspark(spark, data, n_trials, epochs, batch_size, timeout_s, directory):
    import pandas as pd

    import deepspark as ds
    from deepspark.automl import AutoEstimator

    train_x, train_y, val_x, val_y = data

    def frame(x, y):
        pdf = pd.DataFrame({"features": list(x), "label": y})
        return spark.createDataFrame(pdf, "features array<float>, label long").repartition(2)

    train_df, val_df = frame(train_x, train_y), frame(val_x, val_y)
    ds.cache(train_df)
    ds.cache(val_df)
    columns = dict(feature_cols=["features"], label_cols=["label"])

    def search(name, trials, epochs_each):
        return AutoEstimator.from_torch(
            make_model,
            space(),
            optimizer=lambda params, config: torch.optim.Adam(params, lr=config["lr"]),
            loss=torch.nn.CrossEntropyLoss(),
            metrics=["accuracy"],
            metric="val_accuracy",
            pruner="none",
            max_concurrent=2,
            study_name=name,
            directory=os.path.join(directory, name),
            seed=SEED,
        ), dict(n_trials=trials, epochs=epochs_each, batch_size=batch_size, **columns)

    warm, options = search("warm-up", 2, 1)
    warm.fit(train_df, validation_data=val_df, **options)
    auto, options = search("timed", n_trials, epochs)
    started = time.perf_counter()
    table = auto.fit(train_df, validation_data=val_df, timeout_s=timeout_s, **options)
    seconds = time.perf_counter() - started
    return len(table), seconds, auto.best_value, list(table["param_hidden"]), list(table["seconds"])


def run_ray_tune(data, n_trials, epochs, batch_size, timeout_s, directory):
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    import deepspark.ray as dsray

    started = time.perf_counter()
    dsray.start(num_workers=2)
    start_seconds = time.perf_counter() - started
    try:
        import ray

        data_ref = ray.put(data)

        def trial(config):
            accuracy = train_plain(
                config, ray.get(data_ref), config.pop("epochs"), batch_size, SEED
            )
            tune.report({"accuracy": accuracy})

        def tune_run(name, trials, epochs_each):
            import optuna

            search = OptunaSearch(
                {name: dist for name, dist in space().items()},
                metric="accuracy",
                mode="max",
                sampler=optuna.samplers.TPESampler(seed=SEED),
            )
            tuner = tune.Tuner(
                tune.with_resources(
                    lambda config: trial({**config, "epochs": epochs_each}), {"cpu": 1}
                ),
                tune_config=tune.TuneConfig(
                    search_alg=search,
                    num_samples=trials,
                    max_concurrent_trials=2,
                    time_budget_s=timeout_s,
                ),
                run_config=tune.RunConfig(
                    name=name, storage_path=os.path.join(directory, "ray"), verbose=0
                ),
            )
            return tuner.fit()

        tune_run("warm-up", 2, 1)
        started = time.perf_counter()
        results = tune_run("timed", n_trials, epochs)
        seconds = time.perf_counter() - started
        best = results.get_best_result(metric="accuracy", mode="max").metrics["accuracy"]
        frame = results.get_dataframe()
        hidden, busy = list(frame["config/hidden"]), list(frame["time_total_s"])
        return len(results), seconds, best, hidden, busy, start_seconds
    finally:
        dsray.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter trials")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Tune path")
    args = parser.parse_args()
    # full: one trial trains for about 20 s in a single process here (the sizing)
    copies, epochs, n_trials = (2, 3, 4) if args.quick else (8, 40, 10)
    batch_size, timeout_s = 64, 3600.0
    import tempfile

    import deepspark as ds

    load_before = os.getloadavg()[0]
    data = make_data(copies)
    probe = time.perf_counter()
    train_plain({"hidden": 181, "lr": 3e-3, "dropout": 0.1}, data, epochs, batch_size, SEED)
    one_trial_s = time.perf_counter() - probe
    runs = {}
    with tempfile.TemporaryDirectory() as directory:
        runs["sequential Optuna"] = run_sequential(data, n_trials, epochs, batch_size, timeout_s)
        concurrent_s = two_at_once(SEQUENTIAL_CONFIGS, data, epochs, batch_size)
        spark = ds.init_context(cores=2)
        runs["deepspark AutoML"] = run_deepspark(
            spark, data, n_trials, epochs, batch_size, timeout_s, directory
        )
        ray_start = None
        if not args.no_ray:
            *ray_run, ray_start = run_ray_tune(
                data, n_trials, epochs, batch_size, timeout_s, directory
            )
            runs["Ray Tune on Ray on Spark"] = tuple(ray_run)
        ds.stop_context()
    rows = [
        (name, trials, seconds, trials / seconds * 3600, best, float(np.mean(hidden)))
        for name, (trials, seconds, best, hidden, _) in runs.items()
    ]
    print_table(("path", "trials", "seconds", "trials/hour", "best val acc", "mean hidden"), rows)
    result = {
        "benchmark": "automl",
        "date": today(),
        "machine": machine(),
        "quick": args.quick,
        "rows": len(data[1]),
        "epochs": epochs,
        "trial_budget": n_trials,
        "one_trial_single_process_s": round(one_trial_s, 2),
        # the sequential path's configs as plain one-thread trials, two at a time: the
        # trials/hour ratio that no engine running two at once can beat on this machine
        "sequential_configs_two_at_once_s": round(concurrent_s, 1),
        "load_avg_before": round(load_before, 2),
        "load_avg_after": round(os.getloadavg()[0], 2),
    }
    for name, (trials, seconds, best, hidden, busy) in runs.items():
        key = name.split()[0].lower()
        result[f"{key}_trials"] = trials
        result[f"{key}_seconds"] = round(seconds, 1)
        result[f"{key}_trials_per_hour"] = round(trials / seconds * 3600, 1)
        result[f"{key}_best_val_accuracy"] = round(best, 4)
        # TPE picks different configs on each path (concurrent trials see fewer results), and
        # a wider network trains longer: the sizes it chose, and the seconds its trials took
        result[f"{key}_mean_hidden"] = round(float(np.mean(hidden)), 1)
        result[f"{key}_trial_seconds_sum"] = round(float(np.sum(busy)), 1)
    sequential = result["sequential_trials_per_hour"]
    result["ceiling_two_at_once_vs_sequential"] = round(
        result["sequential_seconds"] / concurrent_s, 3
    )
    result["deepspark_vs_sequential_trials_per_hour"] = round(
        result["deepspark_trials_per_hour"] / sequential, 3
    )
    result["deepspark_minus_sequential_best"] = round(
        result["deepspark_best_val_accuracy"] - result["sequential_best_val_accuracy"], 4
    )
    if ray_start is not None:
        result["ray_start_s"] = round(ray_start, 1)
        result["ray_vs_sequential_trials_per_hour"] = round(
            result["ray_trials_per_hour"] / sequential, 3
        )
    emit_json(result)


if __name__ == "__main__":
    run_logged("automl", main)
