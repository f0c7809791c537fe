"""fewshot: meta-learning and few-shot learning on PyTorch.

>>> import fewshot as fs
>>> data = fs.data.glyphs()                                   # built-in, no download
>>> train, test = data.split_fraction(test=0.2)
>>> method = fs.methods.build("protonet", data.image_shape)
>>> fs.train(method, fs.episodes(train, ways=20, shots=5, queries=5), fs.TrainConfig(episodes=500), "runs/x")
>>> print(fs.evaluate(method, fs.episodes(test, ways=5, shots=1, queries=15), episodes=1000))
"""
__version__ = "0.1.0"

from . import data, methods, models  # noqa: E402
from .augment import RandomAffine  # noqa: E402
from .config import RunConfig  # noqa: E402
from .data import ClassDataset  # noqa: E402
from .episodes import Episode, EpisodeSampler, episodes  # noqa: E402
from .errors import FewshotError  # noqa: E402
from .evaluate import EvalResult, evaluate  # noqa: E402
from .run import evaluate_run, fit, lake_eval, load_run, predict_run  # noqa: E402
from .train import TrainConfig, train  # noqa: E402
from .recommend import recommend  # noqa: E402

__all__ = ["ClassDataset", "Episode", "EpisodeSampler", "EvalResult", "FewshotError", "RandomAffine", "RunConfig",
           "TrainConfig", "data", "episodes", "evaluate", "evaluate_run", "fit", "lake_eval", "load_run", "methods",
           "models", "predict_run", "recommend", "train"]
