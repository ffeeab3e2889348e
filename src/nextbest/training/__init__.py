"""The trainer: its inputs (`inputs`: files and store, read and gated by consent) and the fit,
the validation, the bundle and the time-split evaluation (`fit`).

    inputs = read_inputs(InputFiles(events="events.parquet"), settings)
    bundle, report, _ = train(inputs.events, inputs.catalog, settings, content=inputs.content)
    run = evaluate_ranked_at(inputs.events, inputs.catalog, settings, cutoff, k=10, depth=20)
"""

from nextbest.training.fit import (
    DEFAULT_BLEND,
    RankedEvaluation,
    TrainReport,
    evaluate_at,
    evaluate_ranked_at,
    fit_cf,
    split_at,
    train,
)
from nextbest.training.inputs import InputFiles, TrainingInputs, read_inputs, rejects_path

__all__ = [
    "DEFAULT_BLEND",
    "TrainReport",
    "RankedEvaluation",
    "fit_cf",
    "train",
    "evaluate_at",
    "evaluate_ranked_at",
    "split_at",
    "InputFiles",
    "TrainingInputs",
    "read_inputs",
    "rejects_path",
]
