"""Sample-quality metrics: Fréchet distances in a feature space, classifier accuracy on guided samples,
Inception Score; the feature extractors; cached reference statistics.

One code path for every Fréchet distance: torchmetrics' ``FrechetInceptionDistance`` with a feature
extractor module. With Inception-v3 (torch-fidelity's weights, downloaded on first use) the number is the
FID and is reported as ``fid``. For the offline ``digits`` set no Inception weights can be had, so the
extractor is a small digits classifier this module trains once (seeded) and caches; that number is the
Fréchet distance in *its* feature space, reported as ``fd_digits`` and never called FID. Fashion-MNIST, read offline,
has a classifier of its own in the same way (``fd_fashion``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ddpm.core.errors import ConfigError
from ddpm.core.settings import integer, one_of, require
from ddpm.files import atomic_write
from ddpm.data import Digits, stack_dataset

log = logging.getLogger(__name__)

EXTRACTORS = ("auto", "digits_classifier", "fashion_classifier", "inception")
OWN_CLASSIFIER = {"digits": "digits_classifier", "fashion_mnist": "fashion_classifier"}  # auto's choice off Inception
REFERENCE_SPLITS = ("train", "test")


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images (1 or 3 channels) -> uint8 RGB, Inception's input."""
    images = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


# --- feature extractors: [-1, 1] images in, (N, num_features) out; .logits() where there is a classifier ---
class DigitsClassifier(nn.Module):
    """A small CNN for 8x8 digits; its 128-d penultimate activations are the feature space of ``fd_digits``."""

    name = "digits_classifier"
    num_features = 128
    input_size = 8

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.SiLU(),   # 4x4
            nn.Conv2d(64, 128, 3, padding=1, stride=2), nn.SiLU(),  # 2x2
            nn.Flatten(), nn.Linear(128 * 4, self.num_features), nn.SiLU(),
        )
        self.head = nn.Linear(self.num_features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features of [-1, 1] images of any size (resized to 8x8, the digits' own resolution)."""
        images = images.float()
        if images.shape[-1] != self.input_size:
            images = F.interpolate(images, size=self.input_size, mode="bilinear", antialias=True, align_corners=False)
        return self.body(images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self(images))


class FashionClassifier(nn.Module):
    """A CNN for 28x28 Fashion-MNIST (two conv layers with batch norm and max-pooling, dropout before the head); its
    128-d penultimate activations are the feature space of ``fd_fashion``. Images padded to 32 are cropped back to 28."""

    name = "fashion"
    num_features = 128
    input_size = 28

    def __init__(self, num_classes: int = 10):
        super().__init__()
        block = lambda i, o: [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.SiLU()]  # noqa: E731
        self.body = nn.Sequential(
            *block(1, 32), nn.MaxPool2d(2),    # 14x14
            *block(32, 64), nn.MaxPool2d(2),   # 7x7
            nn.Flatten(), nn.Linear(64 * 49, self.num_features), nn.SiLU(),
        )
        self.dropout, self.head = nn.Dropout(0.3), nn.Linear(self.num_features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        size = images.shape[-1]
        if size == 32:
            images = images[..., 2:30, 2:30]
        elif size != self.input_size:
            images = F.interpolate(images, size=self.input_size, mode="bilinear", antialias=True, align_corners=False)
        return self.body(images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self(images)))


class InceptionFeatures(nn.Module):
    """Inception-v3 pool features (2048-d) of [-1, 1] images: the standard FID feature space."""

    name = "inception_v3"
    num_features = 2048

    def __init__(self):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3  # needs torch-fidelity; weights download once

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(self.num_features)])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(to_uint8_rgb(images))


def fit_classifier(model: nn.Module, train_set, test_set, augment: Callable, generator: torch.Generator, epochs: int,
                   batch_size: int, lr: float) -> float:
    """The one training loop of the feature classifiers: AdamW with a cosine schedule, ``augment(x)`` on every batch
    (drawing from ``generator``, which also shuffles); returns the accuracy on ``test_set``, the model left in eval."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * (len(train_set) // batch_size + 1))
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model.logits(augment(x)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    x_test, y_test = stack_dataset(test_set)
    with torch.no_grad():
        return (torch.cat([model.logits(x).argmax(1) for x in x_test.split(1000)]) == y_test).float().mean().item()


def seeded(make: Callable[[], nn.Module], seed: int) -> nn.Module:
    """A model initialised from ``seed`` without touching the global RNG's stream."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return make()


def train_digits_classifier(seed: int = 0, epochs: int = 40, batch_size: int = 64, lr: float = 2e-3) -> tuple[DigitsClassifier, float]:
    """Train the classifier on the digits train split (the diffusion models' own, split_seed 0) with small random
    shifts; returns it and its accuracy on the held-out test split. Deterministic given ``seed`` on a CPU."""
    data = Digits(root=".", batch_size=batch_size, num_workers=0, image_size=8, channels=1, num_classes=10)
    data.setup()
    generator = torch.Generator().manual_seed(seed)
    model = seeded(DigitsClassifier, seed)

    def shift(x):  # by up to one pixel (the digits are not centred exactly alike) so features are not brittle
        dx, dy = torch.randint(-1, 2, (2,), generator=generator).tolist()
        return torch.roll(F.pad(x, (1, 1, 1, 1), value=-1.0), shifts=(dy, dx), dims=(2, 3))[..., 1:-1, 1:-1]

    return model, fit_classifier(model, data.train_set, data.test_set, shift, generator, epochs, batch_size, lr)


def cached_classifier(path: Path, model: nn.Module, train: Callable[[], tuple[nn.Module, dict]], what: str):
    """A feature classifier's weights and description from ``path``, or ``train()`` once and cache it there: the one
    cache of every classifier of a data set of its own (digits, Fashion-MNIST)."""
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        info = saved["info"]
    else:
        log.info("training the %s (once; cached at %s)", what, path)
        model, info = train()
        _atomic_save({"state_dict": model.state_dict(), "info": info}, path)
    return model.eval().requires_grad_(False), info


def load_digits_classifier(cache_dir: str | Path, seed: int = 0) -> tuple[DigitsClassifier, dict]:
    """The seeded digits classifier, trained on first use and cached as ``cache_dir/digits_classifier_seed{seed}.pt``."""
    def train():
        model, accuracy = train_digits_classifier(seed)
        return model, {"seed": seed, "test_accuracy": accuracy, "train_split": "digits train (split_seed 0)"}

    return cached_classifier(Path(cache_dir) / f"digits_classifier_seed{seed}.pt", DigitsClassifier(), train,
                             "digits classifier for fd_digits")


def train_fashion_classifier(data, seed: int = 0, epochs: int = 8, batch_size: int = 128, lr: float = 2e-3,
                             limit: int | None = None) -> tuple[FashionClassifier, float]:
    """Train the classifier on Fashion-MNIST's training images (``data``: a set up ``fashion_mnist`` data set; the first
    ``limit`` of them, all by default) with random horizontal flips; returns it and its accuracy on the 10,000 test
    images. Deterministic given ``seed`` on a CPU."""
    generator = torch.Generator().manual_seed(seed)
    model = seeded(FashionClassifier, seed)
    train_set = data.train_set if limit is None else torch.utils.data.Subset(data.train_set, range(min(limit, len(data.train_set))))

    def flip(x):  # garments are left-right symmetric enough
        flipped = torch.rand(len(x), generator=generator) < 0.5
        return torch.where(flipped.view(-1, 1, 1, 1), x.flip(-1), x)

    return model, fit_classifier(model, train_set, data.test_set, flip, generator, epochs, batch_size, lr)


def load_fashion_classifier(cache_dir: str | Path, data, seed: int = 0) -> tuple[FashionClassifier, dict]:
    """The seeded Fashion-MNIST classifier, trained on first use (minutes on a CPU) and cached as
    ``cache_dir/fashion_classifier_seed{seed}.pt``."""
    def train():
        data.setup()
        model, accuracy = train_fashion_classifier(data, seed)
        return model, {"seed": seed, "test_accuracy": accuracy, "train_split": "fashion_mnist train (60,000 images)"}

    return cached_classifier(Path(cache_dir) / f"fashion_classifier_seed{seed}.pt", FashionClassifier(), train,
                             "Fashion-MNIST classifier for fd_fashion (a few minutes)")


def build_extractor(name: str, dataset: str, cache_dir: str | Path, data=None) -> tuple[nn.Module, dict]:
    """The feature extractor ``name`` (``auto``: the data set's own classifier for digits and Fashion-MNIST,
    Inception-v3 otherwise) and a description of it for the protocol; ``data``: the data set a classifier trains on."""
    one_of("metrics.feature_extractor", name, EXTRACTORS)
    if name == "auto":
        name = OWN_CLASSIFIER.get(dataset, "inception")
    if name == "digits_classifier":
        model, info = load_digits_classifier(cache_dir)
        return model, {"name": model.name, "num_features": model.num_features, **info}
    if name == "fashion_classifier":
        if dataset != "fashion_mnist" or data is None:
            raise ConfigError(f"metrics.feature_extractor=fashion_classifier: trained on Fashion-MNIST images, so it "
                              f"measures data=fashion_mnist only (this is {dataset})")
        model, info = load_fashion_classifier(cache_dir, data)
        return model, {"name": model.name, "num_features": model.num_features, **info}
    model = InceptionFeatures()
    return model, {"name": model.name, "num_features": model.num_features, "weights": "torch-fidelity inception-v3-compat"}


def metric_name(extractor: nn.Module, distance: str = "fd") -> str:
    """A distance's name in ``extractor``'s feature space: FID and KID only for Inception features; any other feature
    space gets its own suffix (fd_digits, kid_fashion, fd_<name>): one name, one meaning."""
    name = getattr(extractor, "name", type(extractor).__name__.lower())
    if name == "inception_v3":
        return "fid" if distance == "fd" else distance
    return f"{distance}_digits" if name == "digits_classifier" else f"{distance}_{name}"


# --- the metrics ------------------------------------------------------------------------------------------
@dataclass
class Reference:
    """Real images' feature statistics (sums, as torchmetrics keeps them) and where they came from."""

    features_sum: torch.Tensor
    features_cov_sum: torch.Tensor
    num_samples: int
    spread: dict = field(default_factory=dict)  # class_spread of the real images: {"per_class": ..., "all": ...}
    info: dict = field(default_factory=dict)
    features: torch.Tensor | None = None  # the first PRECISION_RECALL_REFERENCE real features, for precision and recall


# Improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union of balls around its points
# reaching their k-th nearest neighbour; precision is the share of generated points inside the real manifold, recall
# the share of real points inside the generated one. k = 3 as in the paper; the real features kept for it are capped,
# since the cost grows with the product of the two set sizes (the paper uses 50k of each; digits has 1,617).
PRECISION_RECALL_K = 3
PRECISION_RECALL_REFERENCE = 10_000


def knn_radii(features: torch.Tensor, k: int = PRECISION_RECALL_K, batch_size: int = 1024) -> torch.Tensor:
    """The distance from each point to its k-th nearest other point of the same set (sec. 3 of the paper)."""
    radii = []
    for i in range(0, len(features), batch_size):
        distances = torch.cdist(features[i:i + batch_size], features)
        radii.append(distances.topk(k + 1, dim=1, largest=False).values[:, k])  # the first is the point itself
    return torch.cat(radii)


def manifold_share(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int = 1024) -> float:
    """The share of ``points`` within ``radii`` of at least one of ``centres`` (eq. 1 of the paper, averaged)."""
    inside = [(torch.cdist(points[i:i + batch_size], centres) <= radii[None, :]).any(dim=1)
              for i in range(0, len(points), batch_size)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real: torch.Tensor, generated: torch.Tensor, k: int = PRECISION_RECALL_K) -> dict:
    """Improved precision and recall of ``generated`` against ``real`` features (both N x D)."""
    return {"precision": manifold_share(generated, real, knn_radii(real, k)),
            "recall": manifold_share(real, generated, knn_radii(generated, k))}


# Kernel Inception Distance (Binkowski et al. 2018): the unbiased estimate of the squared maximum mean discrepancy with
# the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets of both sets (their code and
# torchmetrics': 100 subsets of 1,000). Unbiased, so unlike a Fréchet distance its mean does not drift with the sample
# count; the subsets' std says how much one subset's estimate varies. Both are settings, not hidden constants.
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


def kernel_distance(real: torch.Tensor, generated: torch.Tensor, subsets: int = KID_SUBSETS,
                    subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> tuple[float, float]:
    """KID of ``generated`` against ``real`` features (N x D): the mean and std over ``subsets`` draws of
    min(subset_size, N_real, N_generated) rows of each (seeded: the same sets give the same numbers), each draw's
    MMD^2_u computed by torchmetrics' ``poly_mmd`` (eq. 3 of Gretton et al. 2012 with the polynomial kernel)."""
    from torchmetrics.image.kid import poly_mmd

    size = min(subset_size, len(real), len(generated))
    if size < 2:
        raise ValueError(f"KID needs at least 2 features in each set (got {len(real)} real, {len(generated)} generated)")
    generator = torch.Generator().manual_seed(seed)
    scores = torch.stack([poly_mmd(real[torch.randperm(len(real), generator=generator)[:size]],
                                   generated[torch.randperm(len(generated), generator=generator)[:size]])
                          for _ in range(subsets)])
    return scores.mean().item(), (scores.std(unbiased=False).item() if subsets > 1 else 0.0)


@torch.no_grad()
def _features(extractor: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    device = next(extractor.parameters()).device
    return torch.cat([extractor(images[i:i + batch_size].to(device)).double().cpu() for i in range(0, len(images), batch_size)])


def class_spread(features: torch.Tensor, labels: torch.Tensor | None) -> float:
    """Mean over classes of the root mean per-dimension variance of the features: how spread out (diverse)
    images of one class are."""
    groups = [features[labels == c] for c in labels.unique()] if labels is not None else [features]
    spreads = [g.var(0).mean().sqrt() for g in groups if len(g) > 1]
    return torch.stack(spreads).mean().item() if spreads else math.nan  # no class drawn twice: no spread to measure


def _atomic_save(obj, path: Path) -> None:
    """torch.save through ``ddpm.files.atomic_write``: a reader (another process of a multirun) never sees half a file."""
    atomic_write(path, lambda f: torch.save(obj, f), what="cache file")


def reference_statistics(extractor: nn.Module, dataset: Dataset, info: dict, cache_dir: str | Path | None = None,
                         limit: int | None = None) -> Reference:
    """Feature statistics of ``dataset`` (the first ``limit`` images), cached in ``cache_dir`` under a key made of
    ``info`` (dataset, split, resolution, extractor): computed once per dataset and resolution."""
    info = {**info, "size": min(limit or len(dataset), len(dataset)), "precision_recall_features": PRECISION_RECALL_REFERENCE}
    key = hashlib.sha1(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"reference_{info.get('dataset', 'data')}_{key}.pt" if cache_dir else None
    if path is not None and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return Reference(saved["sum"], saved["cov_sum"], int(saved["n"]), saved["spread"], saved["info"], saved["features"])
    images, labels = stack_dataset(dataset, limit)
    features = _features(extractor, images)
    spread = {"per_class": class_spread(features, labels), "all": class_spread(features, None)}
    reference = Reference(features.sum(0), features.T @ features, len(features), spread, info,
                          features[:PRECISION_RECALL_REFERENCE].float())
    if path is not None:
        _atomic_save({"sum": reference.features_sum, "cov_sum": reference.features_cov_sum, "n": reference.num_samples,
                      "spread": reference.spread, "info": info, "features": reference.features}, path)
    return reference


def prepare(feature_extractor: str, datamodule, split: str, cache_dir: str | Path | None, limit: int | None = None,
            device: str | torch.device = "cpu") -> tuple[nn.Module, dict, Reference]:
    """The feature extractor for ``datamodule``'s images, its description, and the reference statistics of its
    ``split`` (cached on disk per dataset, split, resolution and extractor). Kept in memory too, so the callbacks
    of one run (sample_quality, evaluate_at_end) and the runs of one multirun share one extractor."""
    one_of("metrics.feature_extractor", feature_extractor, EXTRACTORS)
    one_of("metrics.reference_split", split, REFERENCE_SPLITS)
    require(limit is None or (integer(limit) and limit >= 2), "metrics.reference_size", limit, "null or an integer >= 2")
    datamodule.prepare_data()
    key = {"dataset": datamodule.name, "split": split, "image_size": datamodule.image_size,
           "channels": datamodule.channels}
    if datamodule.name == "image_folder":
        key["root"] = str(datamodule.root.resolve())
    memo_key = json.dumps([feature_extractor, key, str(cache_dir), limit, str(device)], sort_keys=True)
    PREPARATIONS["uses"] += 1
    if memo_key not in _PREPARED:
        PREPARATIONS["built"] += 1
        log.info("feature extractor and reference statistics for %s/%s: built, and kept for this process", datamodule.name, split)
        extractor, extractor_info = build_extractor(feature_extractor, datamodule.name, cache_dir, datamodule)
        extractor = extractor.to(device)
        reference = reference_statistics(extractor, datamodule.reference_set(split),
                                         {**key, "feature_extractor": extractor_info["name"]}, cache_dir, limit)
        _PREPARED[memo_key] = extractor, extractor_info, reference
    return _PREPARED[memo_key]


_PREPARED: dict[str, tuple[nn.Module, dict, Reference]] = {}
# How often this process asked for an extractor and reference statistics, and how often it had to build them: a
# multirun of evaluations in one process builds them once (ddpm.evaluate records both in metrics.json).
PREPARATIONS = {"uses": 0, "built": 0}


class _Precomputed(nn.Module):
    """Features in, features out: torchmetrics accumulates and compares features computed once, elsewhere."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@torch.no_grad()
def sample_metrics(extractor: nn.Module, reference: Reference, images: torch.Tensor,
                   labels: torch.Tensor | None = None) -> dict:
    """Fréchet distance of ``images`` ([-1, 1]) to the reference in ``extractor``'s feature space; with labels and a
    classifier, its accuracy on the requested labels; the within-class diversity relative to the real data; improved
    precision and recall (k = 3) and KID (against the reference's kept real features) in the same feature space."""
    from torchmetrics.image.fid import FrechetInceptionDistance  # here: its import costs a command a second

    features = _features(extractor, images)  # once: the Fréchet distance, accuracy and diversity all use them
    fd = FrechetInceptionDistance(feature=_Precomputed(features.shape[1]), reset_real_features=False)
    fd.real_features_sum.copy_(reference.features_sum)
    fd.real_features_cov_sum.copy_(reference.features_cov_sum)
    fd.real_features_num_samples.fill_(reference.num_samples)
    fd.update(features, real=False)
    out = {metric_name(extractor): fd.compute().item()}
    if labels is not None and hasattr(extractor, "head"):
        predicted = extractor.head(features.to(extractor.head.weight)).argmax(1).cpu()
        out["guided_accuracy"] = (predicted == labels.cpu()).float().mean().item()
    spread = class_spread(features, labels.cpu() if labels is not None else None)
    if reference.spread and math.isfinite(spread):  # 1.0: samples of a class are as varied as real images of that class
        out["diversity"] = spread / reference.spread["per_class" if labels is not None else "all"]
    if reference.features is not None and min(len(features), len(reference.features)) > PRECISION_RECALL_K:
        real = reference.features.double()
        out.update(precision_recall(real, features))
        name = metric_name(extractor, "kid")
        out[name], out[f"{name}_std"] = kernel_distance(real, features)
    return out


def inception_score(images: torch.Tensor, splits: int = 10) -> dict:
    """Inception Score (Salimans et al. 2016) of RGB [-1, 1] images, torchmetrics' implementation."""
    from torchmetrics.image.inception import InceptionScore

    metric = InceptionScore(splits=splits)
    for i in range(0, len(images), 500):
        metric.update(to_uint8_rgb(images[i:i + 500]))
    mean, std = metric.compute()
    return {"inception_score": mean.item(), "inception_score_std": std.item()}
