"""fd_fashion (issue 33, item 2 in part): Fashion-MNIST's own feature space, a classifier trained on its 60,000
training images. The full classifier trains once per machine (minutes); these tests train a small one on 3,000 images
for one epoch: they test the code and the ordering of the metric, docs/evaluation.md gives the full one's accuracy."""

from pathlib import Path

import pytest
import torch

from ddpm.core.errors import ConfigError
from ddpm.data import DEBIAN_PACKAGES, Torchvision
from ddpm.evaluation.metrics import (_atomic_save, build_extractor, reference_statistics, sample_metrics,
                                     train_fashion_classifier)

DEBIAN = Path(DEBIAN_PACKAGES["fashion_mnist"][1])
pytestmark = pytest.mark.skipif(not DEBIAN.is_dir(), reason="apt-get install dataset-fashion-mnist (Debian's Fashion-MNIST)")


@pytest.fixture(scope="module")
def fashion():
    data = Torchvision(name="fashion_mnist", root="/nonexistent", download=False, batch_size=128, num_workers=0,
                       image_size=28, channels=1, num_classes=10)
    data.setup()
    model, accuracy = train_fashion_classifier(data, epochs=1, limit=3000)
    return data, model, accuracy


def test_the_small_classifier_learns_and_the_metric_orders_real_noisy_and_noise(fashion):
    data, model, accuracy = fashion
    assert accuracy > 0.6  # one epoch on 3,000 images; the full classifier: docs/evaluation.md
    reference = reference_statistics(model, data.train_set, {"dataset": "fashion_mnist"}, None, limit=2000)
    real = torch.stack([data.test_set[i][0] for i in range(1000)])
    labels = torch.stack([data.test_set[i][1] for i in range(1000)])
    generator = torch.Generator().manual_seed(0)
    noisy = (real + 0.3 * torch.randn(real.shape, generator=generator)).clamp(-1, 1)
    noise = torch.rand(real.shape, generator=generator) * 2 - 1
    measured = [sample_metrics(model, reference, images, labels) for images in (real, noisy, noise)]
    scores = [m["fd_fashion"] for m in measured]
    assert scores[0] < scores[1] < scores[2], scores
    kid = [m["kid_fashion"] for m in measured]  # KID orders them the same way, and real images score about 0
    assert kid[0] < kid[1] < kid[2] and abs(kid[0]) < 3 * measured[0]["kid_fashion_std"] + 1e-3, kid
    assert measured[0]["guided_accuracy"] > 0.6


def test_auto_picks_the_cached_fashion_classifier_and_refuses_it_off_fashion(fashion, tmp_path):
    data, model, accuracy = fashion
    info = {"seed": 0, "test_accuracy": accuracy, "train_split": "a small test version"}
    _atomic_save({"state_dict": model.state_dict(), "info": info}, tmp_path / "fashion_classifier_seed0.pt")
    extractor, described = build_extractor("auto", "fashion_mnist", tmp_path, data)
    assert extractor.name == "fashion" and described["test_accuracy"] == accuracy
    with pytest.raises(ConfigError, match=r"metrics.feature_extractor=fashion_classifier: .* data=fashion_mnist only"):
        build_extractor("fashion_classifier", "digits", tmp_path, None)


def test_a_fashion_run_trains_and_ddpm_evaluate_reports_its_own_metrics(fashion, tmp_path):
    """Issue 33's acceptance 1, small: data=fashion_mnist experiments=quick trains on Debian's files at 28x28, and
    ddpm.evaluate on its checkpoint reports fd_fashion, KID, precision/recall and accuracy in the classifier's features
    (the small classifier of the fixture stands in for the cached one)."""
    from ddpm.config import compose
    from ddpm.evaluate import evaluate
    from ddpm.train import train

    data, model, accuracy = fashion
    cache = tmp_path / "cache"
    _atomic_save({"state_dict": model.state_dict(), "info": {"seed": 0, "test_accuracy": accuracy}},
                 cache / "fashion_classifier_seed0.pt")
    run = tmp_path / "run"
    train(compose(["data=fashion_mnist", "experiments=quick", "logger=none", "trainer.max_steps=3",
                   "trainer.enable_progress_bar=false", "data.batch_size=16", "model.base_channels=16",
                   "model.norm_groups=4", "schedule.timesteps=100", "callbacks.sample_grid.steps=2",
                   "callbacks.sample_grid.per_class=1", f"paths.cache_dir={cache}"], output_dir=run))
    assert (run / "samples" / "final.png").is_file()
    record = evaluate(compose([f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "num_samples=40", "sampler.steps=2",
                               "metrics.reference_size=500", f"paths.cache_dir={cache}"],
                              config_name="evaluate", output_dir=tmp_path / "eval"))
    metrics = record["metrics"]
    assert {"fd_fashion", "kid_fashion", "kid_fashion_std", "precision", "recall", "guided_accuracy"} <= set(metrics)
    assert record["protocol"]["feature_extractor"]["name"] == "fashion" and metrics["fd_fashion"] > 0
