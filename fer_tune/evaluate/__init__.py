"""After the search: retrain the best configuration and test it once, transfer it to another
dataset, evaluate any checkpoint on any data, predict the emotions in photos.

    from fer_tune.evaluate import retrain, transfer, evaluate_checkpoint, predict_images
    retrain("cnn-20250101-120000", seeds=3)            # -> results/<experiment>/final/
    transfer("cnn-20250101-120000", to="rafdb", strategy="all")   # -> results/<experiment>/transfer/

Modules: `experiment` (reading a search's tables back), `evaluate` (scores, `fer-tune evaluate`),
`retrain`, `transfer`, `predict`, `report` (report.md plots), `cli`.
"""

from fer_tune.evaluate.evaluate import EvalData, evaluate_checkpoint, evaluation_metrics, split_scores
from fer_tune.evaluate.experiment import Experiment, RankedConfig, read_experiment
from fer_tune.evaluate.predict import Prediction, predict_images
from fer_tune.evaluate.retrain import retrain
from fer_tune.evaluate.transfer import transfer

__all__ = ["EvalData", "Experiment", "Prediction", "RankedConfig", "evaluate_checkpoint", "evaluation_metrics",
           "predict_images", "read_experiment", "retrain", "split_scores", "transfer"]
