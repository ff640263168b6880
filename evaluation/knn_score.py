"""The cheap downstream score a Tune search ranks trials by (with `objective: knn_top1`): kNN
top-1 of frozen encoder features at each checkpoint, run by rank 0 through `build_trainer`'s
`extra_scores`. Independent of the loss weights being searched, unlike the weighted loss.

It lives here, not in pipeline/search/, because it is evaluation (features, kNN): the search
takes it as an argument (`run_search(..., make_score=KnnScore)`, passed by jobs.tune and
jobs.end_to_end), so the layering stays pipeline -> evaluation -> jobs.
"""

from __future__ import annotations

from pipeline.config import Config
from pipeline.passes import eval_mode, take_batches
from pipeline.search.settings import KnnScoreSettings


class KnnScore:
    """Cheap downstream score at each checkpoint: kNN top-1 of frozen, pooled encoder features,
    a labelled subset of the training shards voting for held-out images (data.val_shards,
    required: the training images would find themselves). The images are decoded once, on the
    first call, in the rank-0 worker."""

    def __init__(self, cfg: Config, probe: KnnScoreSettings) -> None:
        if not cfg.data.val_shards:
            raise ValueError(
                "the kNN score needs data.val_shards: with the training shards as queries, each "
                "image would find itself"
            )
        self.cfg, self.probe = cfg, probe
        self._data: tuple[list[dict], list[dict]] | None = None

    def _batches(self, urls: str, n: int) -> list[dict]:
        from pipeline.data import build_loader

        loader = build_loader(self.cfg.data, self.cfg.mask, urls=urls, train=False)
        return list(take_batches(loader, n_images=n))

    def __call__(self, trainer) -> dict[str, float]:
        from evaluation.features import extract
        from evaluation.knn import knn_classify

        if self._data is None:
            self._data = (
                self._batches(self.cfg.data.train_shards, self.probe.train_samples),
                self._batches(self.cfg.data.val_shards, self.probe.val_samples),
            )
        layer = self.probe.layer or trainer.g.feature_layers[-1]
        with eval_mode(trainer.g) as g:
            train = extract(g, [layer], self._data[0], self.probe.max_dim)[layer]
            test = extract(g, [layer], self._data[1], self.probe.max_dim)[layer]
        classes = int(max(train.labels.max(), test.labels.max())) + 1
        scores = knn_classify(train.x, train.labels, test.x, test.labels, num_classes=classes)
        return {"knn_top1": scores["knn_top1"]}
