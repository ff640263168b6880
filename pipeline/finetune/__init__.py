"""Fine-tuning: the whole encoder plus a linear head, trained with labels on Ray Train (DDP),
the epoch chosen on a validation carve of the training images, the test shards scored once.
One module per concern:

    settings.py  the fine-tune YAML: FinetuneConfig (data, optim, model, run), load_finetune_config
    carve.py     the stratified label fraction and the val carve, written once as small shards
    model.py     Classifier (encoder stages + linear head), pad-and-crop, the lr schedule
    loop.py      the Ray Train worker loop and the TorchTrainer that runs it
    score.py     top-1 over a loader, Wilson's 95 % interval
    run.py       select (carve, train, choose on val) then score_test; the result row

No evaluation/ imports here (the layering runs pipeline -> evaluation -> jobs): the encoder
arrives as an `EncoderInit` (weights + architecture), which `jobs.finetune` loads through
evaluation.finetune_source.
"""

from pipeline.finetune.run import (
    EncoderInit,
    FinetuneResult,
    open_run,
    resolve_finetune_paths,
    run_finetune,
    score_test,
    select,
)
from pipeline.finetune.settings import FinetuneConfig, load_finetune_config

__all__ = [
    "EncoderInit",
    "FinetuneConfig",
    "FinetuneResult",
    "load_finetune_config",
    "open_run",
    "resolve_finetune_paths",
    "run_finetune",
    "score_test",
    "select",
]
