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
    scores = [sample_metrics(model, reference, images, labels)["fd_fashion"] for images in (real, noisy, noise)]
    assert scores[0] < scores[1] < scores[2], scores
    assert sample_metrics(model, reference, real, labels)["guided_accuracy"] > 0.6


def test_auto_picks_the_cached_fashion_classifier_and_refuses_it_off_fashion(fashion, tmp_path):
    data, model, accuracy = fashion
    info = {"seed": 0, "test_accuracy": accuracy, "train_split": "a small test version"}
    _atomic_save({"state_dict": model.state_dict(), "info": info}, tmp_path / "fashion_classifier_seed0.pt")
    extractor, described = build_extractor("auto", "fashion_mnist", tmp_path, data)
    assert extractor.name == "fashion" and described["test_accuracy"] == accuracy
    with pytest.raises(ConfigError, match=r"metrics.feature_extractor=fashion_classifier: .* data=fashion_mnist only"):
        build_extractor("fashion_classifier", "digits", tmp_path, None)
