"""Does fd_fashion (and KID, precision, recall, class accuracy in the same features) order images as it should, and
how do the numbers move with the sample count? The table of docs/evaluation.md.

Against the 60,000 Fashion-MNIST training images (the reference ``ddpm.evaluate`` uses by default), in the cached
classifier's features (``metrics.feature_extractor=fashion_classifier``): the real test images at 1,000, 5,000 and
10,000, then degraded versions of all 10,000 (a 3x3 binomial blur, Gaussian noise of std 0.3 in [-1, 1]), then uniform
noise. Needs Debian's dataset-fashion-mnist; trains the classifier on first use (minutes).

    python benchmarks/metric_sanity.py [--cache-dir ~/.cache/ddpm]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from ddpm.data import Torchvision, stack_dataset
from ddpm.evaluation.metrics import load_fashion_classifier, reference_statistics, sample_metrics


def blur(images: torch.Tensor) -> torch.Tensor:
    """A 3x3 binomial blur ([1, 2, 1]/4 in each direction), edges replicated."""
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).view(1, 1, 3, 3)
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/ddpm"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise")
    args = parser.parse_args()
    data = Torchvision(name="fashion_mnist", root="/nonexistent", download=False, batch_size=128, num_workers=0,
                       image_size=28, channels=1, num_classes=10)
    data.setup()
    extractor, info = load_fashion_classifier(args.cache_dir, data)
    reference = reference_statistics(extractor, data.train_set, {"dataset": "fashion_mnist", "split": "train",
                                                                 "image_size": 28, "channels": 1,
                                                                 "feature_extractor": extractor.name}, args.cache_dir)
    test, labels = stack_dataset(data.test_set)
    g = torch.Generator().manual_seed(args.seed)
    rows = [("test set", 1000, test[:1000], labels[:1000]), ("test set", 5000, test[:5000], labels[:5000]),
            ("test set", 10000, test, labels),
            ("test set, blurred (3x3 binomial)", 10000, blur(test), labels),
            ("test set + noise (std 0.3)", 10000, (test + 0.3 * torch.randn(test.shape, generator=g)).clamp(-1, 1), labels),
            ("uniform noise", 10000, torch.rand(test.shape, generator=g) * 2 - 1, labels)]
    print(f"classifier: {info}")
    print("| images | n | fd_fashion | kid_fashion (± std over subsets) | precision | recall | guided_accuracy | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name, n, images, wanted in rows:
        start = time.perf_counter()
        m = sample_metrics(extractor, reference, images, wanted)
        print(f"| {name} | {n:,} | {m['fd_fashion']:.2f} | {m['kid_fashion']:.4f} ± {m['kid_fashion_std']:.4f} | "
              f"{m['precision']:.3f} | {m['recall']:.3f} | {m['guided_accuracy']:.3f} | {time.perf_counter() - start:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
