"""The data sets: images in [-1, 1] and class labels, as plain torch datasets (no Lightning).

``digits`` is scikit-learn's bundled 8x8 handwritten digits: no download, the offline default. ``mnist`` and
``fashion_mnist`` are read from their IDX files where they are found (``root``, torchvision's layout under it, or
Debian's ``dataset-fashion-mnist`` package), at their own 28 x 28 or padded to 32; they and ``cifar10`` download
through torchvision into ``root`` on a machine with internet access;
``image_folder`` reads ``root/<class>/<image>`` trees. The ``data`` group builds one of these; training wraps it in a
LightningDataModule (``ddpm.training.data``), evaluation reads its reference split.
"""

from __future__ import annotations

import os
from pathlib import Path

import functools

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, random_split

from ddpm.core.errors import ConfigError
from ddpm.core.settings import integer, number, one_of, require

# torchvision is imported where a data set needs it (its import alone costs a command 2.7 s): digits never do.


def to_rgb(image):
    """Module-level (not a lambda) so data loader workers can pickle the transform."""
    return image.convert("RGB")


def stack_dataset(dataset: Dataset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` (all) images and labels of ``dataset`` as two tensors. A private generator: creating a
    loader's iterator otherwise draws a seed from the global RNG, shifting a training run's stream."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return next(iter(DataLoader(dataset, batch_size=n, shuffle=False, generator=torch.Generator())))


class ImageData:
    """What every data set shares: its splits, its shape, and how training batches it (``batch_size``,
    ``num_workers``, ``on_device``: read by ``ddpm.training.data.DataModule``, by nothing else). Its settings are checked
    as it is made (nothing is read from disk until ``check``, ``prepare_data`` or ``setup``)."""

    name = "images"  # names the dataset in evaluation protocols and cached reference statistics

    def __init__(self, root: str, batch_size: int, num_workers: int, image_size: int, channels: int, num_classes: int,
                 on_device: bool = False, sigma_data: float = 0.5):
        positive = lambda v: integer(v) and v > 0  # noqa: E731
        for key, value in (("batch_size", batch_size), ("image_size", image_size), ("num_classes", num_classes)):
            require(positive(value), f"data.{key}", value, "an integer > 0")
        require(integer(num_workers) and num_workers >= 0, "data.num_workers", num_workers, "an integer >= 0")
        require(channels in (1, 3) and integer(channels), "data.channels", channels, "1 or 3")
        require(isinstance(on_device, bool), "data.on_device", on_device, "true or false")
        require(number(sigma_data) and sigma_data > 0, "data.sigma_data", sigma_data, "a number > 0 (the std of the data in [-1, 1])")
        self.root, self.batch_size, self.num_workers = Path(root).expanduser(), batch_size, num_workers
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
        self.on_device = on_device
        self.sigma_data = sigma_data  # the images' std in [-1, 1]: what EDM's preconditioning reads (process.sigma_data)
        self.train_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def check(self) -> None:
        """Fail fast, before any model is built, when the data cannot be had (missing or empty paths)."""

    def prepare_data(self) -> None:
        """Download what is missing (torchvision sets); nothing for the others."""

    def setup(self) -> None:
        """Load the splits, once."""
        if self.train_set is None:
            self.load()

    def load(self) -> None:
        """Set ``train_set`` and ``test_set``, without random augmentation: a ``random_flip`` is the training loader's
        (``ddpm.training.data``), drawn from (seed, epoch, image) so that a resumed run flips as the uninterrupted one."""
        raise NotImplementedError

    def reference_set(self, split: str) -> Dataset:
        """The ``train`` or ``test`` split without augmentation: the real images sample quality is measured against."""
        self.setup()
        sets = {"train": self.train_set, "test": self.test_set}
        if sets.get(split) is None:
            available = [name for name, dataset in sets.items() if dataset is not None]
            raise ConfigError(f"metrics.reference_split={split!r}: {self.name} has the splits {available}")
        return sets[split]

    def to_unit_range(self) -> list:
        """Transforms from a PIL image to a tensor in [-1, 1] of ``image_size`` and ``channels``."""
        from torchvision import transforms

        return [
            transforms.Grayscale(1) if self.channels == 1 else transforms.Lambda(to_rgb),
            transforms.Resize(self.image_size),
            transforms.CenterCrop(self.image_size),
            transforms.ToTensor(),
            transforms.Normalize([0.5] * self.channels, [0.5] * self.channels),
        ]


class Digits(ImageData):
    """scikit-learn's 1,797 8x8 digits (grey levels 0..16), split once with a fixed seed into train and test."""

    name = "digits"

    def __init__(self, test_fraction: float = 0.1, split_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        require(number(test_fraction) and 0 < test_fraction < 1, "data.test_fraction", test_fraction, "a number in (0, 1)")
        require(integer(split_seed), "data.split_seed", split_seed, "an integer")
        self.test_fraction, self.split_seed = test_fraction, split_seed

    def load(self) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0 * 2.0 - 1.0
        if self.image_size != images.shape[-1]:
            images = torch.nn.functional.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
        full = TensorDataset(images, torch.tensor(digits.target, dtype=torch.long))
        n_test = round(len(full) * self.test_fraction)
        split = torch.Generator().manual_seed(self.split_seed)
        self.train_set, self.test_set = random_split(full, [len(full) - n_test, n_test], generator=split)


# MNIST and Fashion-MNIST as IDX files (LeCun et al.'s format: a 4-byte magic 0, 0, 0x08 for unsigned bytes, the
# number of dimensions, then each dimension as a big-endian uint32, then the bytes), found where Debian installs them
# (``apt-get install dataset-fashion-mnist``: flat and gzipped) or where torchvision downloads them
# (``<root>/<Name>/raw/``, gzipped or not). Read here, each header checked against its file before anything is
# allocated, rather than by torchvision, which trusts them.
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}  # torchvision's <root>/<Name>/raw
DEBIAN_PACKAGES = {"fashion_mnist": ("dataset-fashion-mnist", "/usr/share/datasets/fashion-mnist")}
IDX_SIDE, IDX_MAX_IMAGES = 28, 100_000  # 28 x 28 images; the largest split of either set has 60,000


def idx_folder(root: Path, name: str) -> Path | None:
    """Where the set's IDX files are: the first of ``root`` and torchvision's ``root/<Name>/raw`` that holds any of them
    (all four are then required: ConfigError naming the one missing), else Debian's folder when it holds all four."""
    stems = [stem for pair in IDX_FILES.values() for stem in pair]
    for folder in (root, root / IDX_FOLDERS[name] / "raw"):
        missing = [stem for stem in stems if idx_path(folder, stem) is None]
        if len(missing) < len(stems):
            if missing:
                raise ConfigError(f"data.root={str(root)!r}: {folder} holds {name} files but not {missing[0]}(.gz); "
                                  "put all four IDX files there")
            return folder
    if name in DEBIAN_PACKAGES and all(idx_path(Path(DEBIAN_PACKAGES[name][1]), stem) for stem in stems):
        return Path(DEBIAN_PACKAGES[name][1])
    return None


def idx_path(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """The uint8 array of an IDX file of ``ndim`` dimensions (images: n x 28 x 28, labels: n), checked: ConfigError,
    one line naming the file, for a wrong magic, shape or count, a header that lies about the size, or a truncated or
    corrupt file."""
    import gzip
    import struct
    import zlib

    opener = gzip.open if path.suffix == ".gz" else open

    def refuse(why: str) -> ConfigError:
        return ConfigError(f"data.root: {path} {why}; reinstall it (apt-get install --reinstall dataset-fashion-mnist) "
                           "or remove it and set data.download=true")

    try:
        with opener(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[:3] != b"\x00\x00\x08" or magic[3] != ndim:
                raise refuse(f"is not an IDX file of unsigned bytes in {ndim} dimension(s) (magic {magic.hex() or 'none'})")
            dims = struct.unpack(f">{ndim}I", f.read(4 * ndim).ljust(4 * ndim, b"\xff"))
            if not 0 < dims[0] <= IDX_MAX_IMAGES or any(d != IDX_SIDE for d in dims[1:]):
                raise refuse(f"says it holds {' x '.join(map(str, dims))}, not up to {IDX_MAX_IMAGES} items"
                             + (f" of {IDX_SIDE} x {IDX_SIDE} pixels" if ndim == 3 else ""))
            size = 1
            for d in dims:
                size *= d
            data = f.read(size + 1)  # one byte more: a file longer than its header says is refused too
    except (OSError, EOFError, zlib.error, struct.error) as error:
        raise refuse(f"is truncated or corrupt ({type(error).__name__}: {str(error)[:80]})") from None
    if len(data) != size:
        raise refuse(f"holds {len(data) if len(data) <= size else 'more than ' + str(size)} bytes of data where its header "
                     f"says {size}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(*dims)


class IDXImages(Dataset):
    """28 x 28 uint8 images and their labels, served in [-1, 1] as 1 x S x S, padded with the background (-1) from 28
    to S = ``image_size`` (28: native; 32: the 4-level U-Net's size, 2 pixels of background on each side)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int = IDX_SIDE):
        self.images, self.labels, self.pad = images, labels.long(), (image_size - IDX_SIDE) // 2

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i].float().div(127.5).sub(1)[None]
        if self.pad:
            x = torch.nn.functional.pad(x, (self.pad,) * 4, value=-1.0)
        return x, self.labels[i]


def read_idx_split(folder: Path, split: str, num_classes: int, image_size: int) -> IDXImages:
    images_path, labels_path = (idx_path(folder, stem) for stem in IDX_FILES[split])
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise ConfigError(f"data.root: {labels_path} holds {len(labels)} labels for the {len(images)} images of "
                          f"{images_path}; the two files must come from the same release")
    if int(labels.max()) >= num_classes:
        raise ConfigError(f"data.num_classes={num_classes}: {labels_path} holds the label {int(labels.max())}")
    return IDXImages(images, labels, image_size)


def torchvision_datasets() -> dict:
    from torchvision import datasets

    return {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}


class Torchvision(ImageData):
    """MNIST, Fashion-MNIST or CIFAR-10 from torchvision, downloaded into ``root`` when ``download`` is set."""

    NAMES = ("cifar10", "fashion_mnist", "mnist")

    def __init__(self, name: str, download: bool = True, random_flip: bool = False, **kwargs):
        super().__init__(**kwargs)
        one_of("data.name", name, sorted(self.NAMES))
        for key, value in (("download", download), ("random_flip", random_flip)):
            require(isinstance(value, bool), f"data.{key}", value, "true or false")
        self.name, self.download, self.random_flip = name, download, random_flip  # instance name shadows the class's

    def check(self) -> None:
        if self.name in IDX_FOLDERS:
            if self.image_size not in (IDX_SIDE, 32):
                raise ConfigError(f"data.image_size={self.image_size}: must be {IDX_SIDE} ({self.name}'s own) or 32 "
                                  "(padded with background for a 4-level U-Net)")
            if idx_folder(self.root, self.name) is not None:
                return
        if not self.download:
            try:
                torchvision_datasets()[self.name](str(self.root), train=True, download=False)
            except RuntimeError:
                package = DEBIAN_PACKAGES.get(self.name)
                hint = f"apt-get install {package[0]} (read from {package[1]}), " if package else "put the dataset there, "
                raise ConfigError(f"data.root={str(self.root)!r}: no {self.name} files there and data.download=false; "
                                  f"{hint}set data.download=true, or use data=digits") from None

    def prepare_data(self) -> None:
        if self.name in IDX_FOLDERS and idx_folder(self.root, self.name) is not None:
            return  # the files are here (or installed by Debian): nothing to download
        for train in (True, False):
            try:
                torchvision_datasets()[self.name](str(self.root), train=train, download=self.download)
            except (OSError, RuntimeError) as error:  # URLError is an OSError
                reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
                raise ConfigError(f"data.root={str(self.root)!r}: could not get {self.name} ({reason}); without internet "
                                  "use data=digits, or copy the files under data.root (DDPM_DATA)") from None

    def load(self) -> None:
        folder = idx_folder(self.root, self.name) if self.name in IDX_FOLDERS else None
        if folder is not None:
            self.train_set = read_idx_split(folder, "train", self.num_classes, self.image_size)
            self.test_set = read_idx_split(folder, "test", self.num_classes, self.image_size)
            return
        make = torchvision_datasets()[self.name]
        from torchvision import transforms

        self.train_set = make(str(self.root), train=True, transform=transforms.Compose(self.to_unit_range()))
        self.test_set = make(str(self.root), train=False, transform=transforms.Compose(self.to_unit_range()))


class ImageFolderData(ImageData):
    """Images under ``root/<class name>/``; classes are the sorted subfolder names. No test split."""

    name = "image_folder"

    def __init__(self, random_flip: bool = False, **kwargs):
        super().__init__(**kwargs)
        require(isinstance(random_flip, bool), "data.random_flip", random_flip, "true or false")
        self.random_flip = random_flip

    def check(self) -> None:
        self.setup()

    def load(self) -> None:
        expected = "class folders root/<class>/<image> of png/jpg/... images"
        if not self.root.is_dir():
            raise ConfigError(f"data.root={str(self.root)!r}: no such directory; expected {expected}")
        from torchvision import transforms

        try:
            train_set = image_folder_class()(str(self.root), transform=transforms.Compose(self.to_unit_range()), loader=read_image)
        except (FileNotFoundError, PermissionError) as error:
            raise ConfigError(f"data.root={str(self.root)!r}: {str(error).splitlines()[0]}; expected {expected}") from None
        found = len(train_set.classes)
        if found != self.num_classes:
            raise ConfigError(f"data.num_classes={self.num_classes}: {self.root} has {found} class folders {train_set.classes[:20]}")
        for path, _ in train_set.samples:  # every file, before the first step rather than when a batch reaches it
            check_image(path)
        self.train_set = train_set


@functools.cache
def image_folder_class() -> type:
    """torchvision's ImageFolder without following directory symlinks (its walk follows them, so a link to a parent
    folder indexes the same images again and again): class folders and the folders below them are real folders;
    an image that is a symlink to a file is read as usual. Made on first use (torchvision's import is slow)."""
    from torchvision import datasets

    class ImageFolder(datasets.ImageFolder):
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            classes = sorted(e.name for e in os.scandir(directory) if e.is_dir(follow_symlinks=False))
            if not classes:
                raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
            return classes, {name: i for i, name in enumerate(classes)}

        @staticmethod
        def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
            samples = []
            for name, index in sorted(class_to_idx.items()):
                for folder, _, files in sorted(os.walk(os.path.join(directory, name), followlinks=False)):
                    samples += [(os.path.join(folder, f), index) for f in sorted(files)
                                if f.lower().endswith(datasets.folder.IMG_EXTENSIONS)]
            present = {index for _, index in samples}
            empty = sorted(name for name, index in class_to_idx.items() if index not in present)
            if empty and not allow_empty:
                raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}. "
                                        f"Supported extensions are: {', '.join(datasets.folder.IMG_EXTENSIONS)}")
            return samples

    return ImageFolder


def check_image(path: str) -> None:
    """Open ``path`` as PIL would and verify it (header and, for PNG, its checksums) without decoding it: zero bytes,
    text, a truncated file or one of more than PIL's MAX_IMAGE_PIXELS (a decompression bomb) is refused, naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.width * image.height > (Image.MAX_IMAGE_PIXELS or float("inf")):
                raise ValueError(f"{image.width}x{image.height} pixels, over PIL's limit of {Image.MAX_IMAGE_PIXELS}")
            image.verify()
    except Exception as error:  # PIL raises many kinds
        raise ConfigError(f"data.root: cannot read image {path} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                          "fix or remove the file") from None


def read_image(path: str):
    """PIL's loader, with the path in the error when a file is corrupt or unreadable."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()
            return image
    except Exception as error:  # PIL raises many kinds
        raise ConfigError(f"data.root: cannot read image {path} ({type(error).__name__}: {error}); fix or remove the file") from None
