"""Fashion-MNIST and MNIST read from their IDX files (issue 33): as Debian installs them, as torchvision lays them out,
and every kind of bad file refused in one line naming it, before any compute."""

import gzip
import struct
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_cli

from ddpm.core.errors import ConfigError
from ddpm.data import DEBIAN_PACKAGES, IDX_FILES, Torchvision

DEBIAN = Path(DEBIAN_PACKAGES["fashion_mnist"][1])


def idx(ndim_dims: tuple, data: bytes, magic: bytes | None = None) -> bytes:
    head = magic if magic is not None else bytes([0, 0, 8, len(ndim_dims)])
    return head + struct.pack(f">{len(ndim_dims)}I", *ndim_dims) + data


def write_set(folder: Path, n_train=5, n_test=3, gz=True, **replace) -> Path:
    """A tiny well-formed set, with ``replace={stem: bytes}`` swapped in."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = IDX_FILES[split]
        contents = {images: idx((n, 28, 28), bytes(range(256)) * (n * 784 // 256) + bytes(n * 784 % 256)),
                    labels: idx((n,), bytes(i % 10 for i in range(n)))}
        for stem, data in contents.items():
            data = replace.get(stem, data)
            (folder / (stem + (".gz" if gz else ""))).write_bytes(gzip.compress(data) if gz else data)
    return folder


def data(root: Path, **kwargs) -> Torchvision:
    return Torchvision(name="fashion_mnist", root=str(root), download=False, batch_size=2, num_workers=0,
                       image_size=kwargs.pop("image_size", 28), channels=1, num_classes=10, **kwargs)


def loaded(root: Path, **kwargs) -> Torchvision:
    d = data(root, **kwargs)
    d.check()
    d.setup()
    return d


def test_a_well_formed_set_reads_in_minus_one_to_one_natively_and_padded(tmp_path):
    d = loaded(write_set(tmp_path / "flat"))
    x, y = d.train_set[1]
    assert len(d.train_set) == 5 and len(d.test_set) == 3 and x.shape == (1, 28, 28) and int(y) == 1
    first = d.train_set[0][0].flatten()
    assert x.min() >= -1 and x.max() <= 1 and first[0] == -1 and first[255] == 1 and first[1] == 1 / 127.5 - 1  # bytes 0, 255, 1
    padded = loaded(write_set(tmp_path / "raw" / "FashionMNIST" / "raw", gz=False).parents[1], image_size=32)
    x32, _ = padded.train_set[1]
    assert x32.shape == (1, 32, 32) and torch.equal(x32[:, 2:30, 2:30], x) and (x32[:, :2] == -1).all()


@pytest.mark.parametrize("stem, data, says", [
    ("train-images-idx3-ubyte", idx((5, 28, 28), bytes(100)), "holds 100 bytes of data where its header says 3920"),
    ("train-images-idx3-ubyte", idx((5, 28, 28), bytes(3921)), "holds more than 3920 bytes"),
    ("train-images-idx3-ubyte", idx((4294967295, 28, 28), bytes(10)), "says it holds 4294967295 x 28 x 28"),
    ("train-images-idx3-ubyte", idx((5, 32, 32), bytes(5 * 1024)), "says it holds 5 x 32 x 32"),
    ("train-labels-idx1-ubyte", idx((5,), bytes(5), magic=b"\x00\x00\x0d\x01"), "is not an IDX file of unsigned bytes"),
    ("train-labels-idx1-ubyte", idx((4,), bytes(4)), "holds 4 labels for the 5 images"),
    ("train-labels-idx1-ubyte", idx((5,), bytes([0, 1, 2, 3, 12])), "data.num_classes=10: "),
    ("t10k-images-idx3-ubyte", b"PK\x03\x04 not an idx file", "is not an IDX file"),
])
def test_a_bad_file_is_refused_in_one_line_naming_it(stem, data, says, tmp_path):
    root = write_set(tmp_path / "set", **{stem: data})
    with pytest.raises(ConfigError) as refused:
        loaded(root)
    message = str(refused.value)
    assert says in message and "\n" not in message and (stem in message or "data.num_classes" in message)


def test_a_truncated_gzip_and_a_missing_file_are_refused_naming_them(tmp_path):
    root = write_set(tmp_path / "set")
    path = root / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ConfigError, match=r"train-images-idx3-ubyte.gz is truncated or corrupt"):
        loaded(root)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ConfigError, match=r"holds fashion_mnist files but not t10k-labels-idx1-ubyte"):
        loaded(root)


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="apt-get install dataset-fashion-mnist (Debian's Fashion-MNIST)")
def test_debians_fashion_mnist_is_read_where_it_is_installed(tmp_path):
    d = loaded(tmp_path / "empty")  # nothing in data.root: Debian's copy, read in place
    assert (len(d.train_set), len(d.test_set)) == (60000, 10000)
    labels = d.test_set.labels
    assert torch.equal(torch.bincount(labels), torch.full((10,), 1000))


@pytest.mark.skipif(DEBIAN.is_dir(), reason="Debian's Fashion-MNIST is installed here: data.root falls back to it")
def test_without_files_the_message_names_the_package_and_the_download(tmp_path):
    with pytest.raises(ConfigError, match=r"apt-get install dataset-fashion-mnist.*data.download=true"):
        data(tmp_path / "empty").check()


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="apt-get install dataset-fashion-mnist (Debian's Fashion-MNIST)")
def test_a_corrupt_set_in_data_root_stops_training_with_exit_2_before_compute(tmp_path):
    root = write_set(tmp_path / "set", **{"train-labels-idx1-ubyte": idx((4,), bytes(4))})
    run = tmp_path / "run"
    result = run_cli("ddpm.train", *TINY, "data=fashion_mnist", f"data.root={root}", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 2 and "holds 4 labels for the 5 images" in result.stderr
    assert not list(run.rglob("*.ckpt"))


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ddpm.data import read_idx  # noqa: E402

VALID = idx((3, 28, 28), bytes(range(256)) * 9 + bytes(3 * 784 - 2304))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, len(VALID)), flips=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=4),
       gz=st.booleans(), extra=st.binary(max_size=8))
def test_any_mangled_idx_file_reads_as_written_or_is_refused_in_one_line(tmp_path, cut, flips, gz, extra):
    """Truncated, bit-flipped, extended, gzipped or not: a file reads back exactly as its header says, or is refused
    with a ConfigError naming it; never another exception, never an allocation its size does not back."""
    data = bytearray(VALID[:cut] + extra)
    for position, value in flips:
        if position < len(data):
            data[position] = value
    path = tmp_path / ("f.gz" if gz else "f")
    path.write_bytes(gzip.compress(bytes(data)) if gz else bytes(data))
    try:
        array = read_idx(path, 3)
    except ConfigError as error:
        assert str(path) in str(error) and "\n" not in str(error)
        return
    n = array.shape[0]
    assert array.shape == (n, 28, 28) and bytes(data) == bytes(data[:4]) + struct.pack(">3I", n, 28, 28) + array.numpy().tobytes()
