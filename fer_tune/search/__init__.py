"""Hyperparameter search: Ray Tune + Optuna (TPE) + ASHA, trials through Ray Train.

    from fer_tune.search import load_space, run_search
    summary = run_search(load_space("smoke"), "fer2013", trials=8, subset=0.05)

Modules: `space` (YAML spaces -> define-by-run sampling), `trainable` (the per-trial functions and
the Ray reporter), `tuner` (`run_search`), `callbacks` and `results` (the trial tables, TensorBoard),
`cluster` (starting/joining Ray, sizing trials), `cli` (`fer-tune search`, `trials`, `board`).
"""

from fer_tune.search.space import SearchSpace, list_spaces, load_space, parse_space

__all__ = ["SearchSpace", "list_spaces", "load_space", "parse_space", "run_search"]


def __getattr__(name):  # run_search imports Ray: only when asked for
    if name == "run_search":
        from fer_tune.search.tuner import run_search

        return run_search
    raise AttributeError(name)
