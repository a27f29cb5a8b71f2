"""Sample-quality metrics and `python -m ddpm.evaluate`: the Fréchet-distance path against its closed form with a
stand-in feature extractor (no Inception weights offline), the digits metric's sanity ordering, the training-time
callback, and the CLI's guidance sweep."""

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import TINY, run_cli
from torch import nn
from torch.utils.data import TensorDataset

from ddpm.training.sampling import SampleQuality
from ddpm.config import compose, native_bf16
from ddpm.data import Digits
from ddpm.evaluate import evaluate
from ddpm.images import to_uint8
from ddpm.evaluation.metrics import load_digits_classifier, metric_name, reference_statistics, sample_metrics
from ddpm.train import train

# The digits classifier trains once per test session (seeded); its tests share one xdist worker.
classifier_group = pytest.mark.xdist_group("digits_classifier")


class StandIn(nn.Module):
    """A fixed random projection of the pixels: a feature extractor that needs no download."""

    name = "standin"
    num_features = 6

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, self.num_features)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, images):
        return torch.tanh(self.proj(images.float().flatten(1)))


def frechet_closed_form(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) in float64 (Heusel et al. 2017)."""
    mu_a, mu_b, s_a, s_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))


@pytest.fixture(scope="session")
def digits():
    data = Digits(root=".", batch_size=1, num_workers=0, image_size=8, channels=1, num_classes=10)
    data.setup()
    return data


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ddpm_cache")


def test_frechet_path_matches_closed_form_with_stand_in_extractor(digits, tmp_path):
    extractor = StandIn().eval()
    assert metric_name(extractor) == "fd_standin"  # only Inception features are ever called FID
    reference = reference_statistics(extractor, digits.train_set, {"dataset": "digits", "split": "train"}, tmp_path)
    real = torch.stack([digits.train_set[i][0] for i in range(len(digits.train_set))])
    fake = real[:300] * 0.5 + 0.2 * torch.randn(real[:300].shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = frechet_closed_form(extractor(real).double().numpy(), extractor(fake).double().numpy())
    got = sample_metrics(extractor, reference, fake)
    assert got["fd_standin"] == pytest.approx(expected, rel=1e-4)
    assert expected > 0.05  # the two sets do differ: the comparison is not 0 == 0
    # Cached statistics are reused, and give the same number.
    assert len(list(tmp_path.glob("reference_digits_*.pt"))) == 1
    again = reference_statistics(extractor, digits.train_set, {"dataset": "digits", "split": "train"}, tmp_path)
    assert torch.equal(again.features_cov_sum, reference.features_cov_sum)
    assert sample_metrics(extractor, again, fake)["fd_standin"] == got["fd_standin"]


@classifier_group
def test_digits_metric_orders_real_noisy_noise(digits, cache_dir):
    classifier, info = load_digits_classifier(cache_dir)
    assert info["test_accuracy"] > 0.95
    reference = reference_statistics(classifier, digits.train_set, {"dataset": "digits", "split": "train"})
    x, y = map(torch.stack, zip(*[(img, torch.tensor(label)) for img, label in digits.test_set]))
    g = torch.Generator().manual_seed(0)
    real = sample_metrics(classifier, reference, x, y)
    noisy = sample_metrics(classifier, reference, (x + 0.6 * torch.randn(x.shape, generator=g)).clamp(-1, 1), y)
    noise = sample_metrics(classifier, reference, torch.rand(x.shape, generator=g) * 2 - 1, y)
    assert real["fd_digits"] * 2 < noisy["fd_digits"] and noisy["fd_digits"] * 2 < noise["fd_digits"]
    assert real["guided_accuracy"] > 0.95 > noisy["guided_accuracy"] > noise["guided_accuracy"] + 0.3
    assert 0.8 < real["diversity"] < 1.2  # held-out digits are about as varied as the training digits
    assert real["precision"] > 0.85 and real["recall"] > 0.85  # held-out digits (180) lie in the training digits' manifold
    assert noise["precision"] + 0.5 < real["precision"] and noise["recall"] + 0.5 < real["recall"]


@classifier_group
def test_classifier_is_loaded_from_its_cache(cache_dir, tmp_path, monkeypatch):
    """A second load reads the cached file: weights marked in a copy of the cache come back, and nothing is trained.
    (Retraining would not show: it is seeded and gives the same weights.)"""
    import shutil

    import ddpm.evaluation.metrics

    _, info = load_digits_classifier(cache_dir)
    copy = tmp_path / "cache"
    copy.mkdir()
    shutil.copyfile(cache_dir / "digits_classifier_seed0.pt", copy / "digits_classifier_seed0.pt")
    saved = torch.load(copy / "digits_classifier_seed0.pt", weights_only=True)
    saved["state_dict"]["head.bias"] = torch.arange(10.0)
    torch.save(saved, copy / "digits_classifier_seed0.pt")
    monkeypatch.setattr(ddpm.evaluation.metrics, "train_digits_classifier", lambda *a, **k: pytest.fail("retrained despite the cache"))
    loaded, loaded_info = load_digits_classifier(copy)
    assert torch.equal(loaded.head.bias, torch.arange(10.0)) and loaded_info == info


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("train")
    train(compose([*TINY, "trainer.max_steps=5", "~callbacks.sample_grid"], output_dir=run))
    return run / "checkpoints" / "last.ckpt"


@classifier_group
def test_evaluate_writes_metrics_and_protocol(checkpoint, cache_dir, tmp_path):
    cfg = compose([f"ckpt_path={checkpoint}", "sampler=ddim", "sampler.steps=4", "num_samples=30", "batch_size=20",
                   "guidance.scale=2", f"paths.cache_dir={cache_dir}"], config_name="evaluate", output_dir=tmp_path)
    record = evaluate(cfg)
    assert json.loads((tmp_path / "metrics.json").read_text()) == record
    metrics, protocol = record["metrics"], record["protocol"]
    assert set(metrics) >= {"fd_digits", "guided_accuracy", "diversity", "nfe", "sampling_seconds", "images_per_second"}
    assert "fid" not in metrics and metrics["nfe"] == 4 and np.isfinite(metrics["fd_digits"])
    # premise changed (issue 19): the reference keeps up to 10,000 real features for precision and recall
    assert protocol["reference"] == {"dataset": "digits", "split": "train", "image_size": 8, "channels": 1,
                                     "feature_extractor": "digits_classifier", "size": 1617,
                                     "precision_recall_features": 10_000}
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    # (premise changed, issue 21: DDIM's spacing, lambda_min and rho are recorded too)
    assert protocol["sampler"] == {"name": "ddim", "steps": 4, "eta": 0.0, "spacing": "time", "lambda_min": None, "rho": 7.0,
                                   "x0_clip": "clip", "percentile": 0.995,
                                   "precision": "bf16" if native_bf16("cpu") else "float32", "compile": False}  # auto, resolved
    assert (protocol["num_samples"], protocol["guidance_scale"], protocol["weights"], protocol["seed"]) == (30, 2.0, "ema", 0)
    assert protocol["checkpoint"]["global_step"] == 5 and protocol["feature_extractor"]["test_accuracy"] > 0.95


@classifier_group
def test_sample_quality_callback_logs_a_curve(cache_dir, tmp_path):
    cfg = compose([*TINY, "trainer.max_steps=6", "~callbacks.sample_grid"], output_dir=tmp_path)
    callback = SampleQuality(every_n_steps=3, num_samples=20, steps=3, cache_dir=str(cache_dir))
    train(cfg, extra_callbacks=[callback])
    assert [row["step"] for row in callback.history] == [3, 6]
    assert all(np.isfinite(row["fd_digits"]) and 0 <= row["guided_accuracy"] <= 1 for row in callback.history)
    (metrics_csv,) = tmp_path.glob("csv/version_*/metrics.csv")
    assert "quality/fd_digits" in metrics_csv.read_text().splitlines()[0]


@classifier_group
def test_guidance_sweep_is_one_multirun(checkpoint, cache_dir, tmp_path):
    result = run_cli("ddpm.evaluate", "--multirun", f"ckpt_path={checkpoint}", "guidance.scale=0,0.5,1,2", "sampler=ddim",
                     "sampler.steps=3", "num_samples=20", f"paths.cache_dir={cache_dir}",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / "sweep" / str(i) / "metrics.json").read_text()) for i in range(4)]
    assert [r["protocol"]["guidance_scale"] for r in records] == [0.0, 0.5, 1.0, 2.0]
    assert all("fd_digits" in r["metrics"] and "guided_accuracy" in r["metrics"] for r in records)
    # One process, four evaluations: the extractor and the reference statistics were built once.
    # premise changed (issue 30): the key was "process", which in this project names the diffusion process
    assert [r["command"] for r in records] == [{"extractor_and_reference_uses": i + 1, "extractor_and_reference_built": 1}
                                              for i in range(4)]


def test_one_extractor_per_process_for_the_same_data(cache_dir):
    """sample_quality and evaluate_at_end (and the runs of a multirun) share the extractor and reference statistics."""
    from ddpm.evaluation.metrics import prepare

    digits = Digits(root=".", batch_size=32, num_workers=0, image_size=8, channels=1, num_classes=10)
    first = prepare("auto", digits, "train", cache_dir)
    again = prepare("auto", Digits(root=".", batch_size=64, num_workers=0, image_size=8, channels=1, num_classes=10),
                    "train", cache_dir)
    assert again[0] is first[0] and again[2] is first[2]
    other_split = prepare("auto", digits, "test", cache_dir)
    assert other_split[2].num_samples != first[2].num_samples


# --- improved precision and recall (Kynkaanniemi et al. 2019), against a brute force (issue 19) --------------------
def _brute_precision_recall(real, fake, k=3):
    """Straight from the paper: a point is in a set's manifold if it is within the k-NN radius of one of its points."""
    def radii(points):
        return [sorted(float(torch.dist(p, q)) for q in points)[k] for p in points]  # index 0: the point itself

    def share(points, centres, r):
        return sum(any(float(torch.dist(p, c)) <= rc for c, rc in zip(centres, r)) for p in points) / len(points)

    return share(fake, real, radii(real)), share(real, fake, radii(fake))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_precision_recall_matches_a_brute_force_knn(seed):
    from ddpm.evaluation.metrics import knn_radii, precision_recall

    g = torch.Generator().manual_seed(seed)
    real = torch.randn(40, 3, generator=g, dtype=torch.float64)
    fake = 0.7 * torch.randn(30, 3, generator=g, dtype=torch.float64) + torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    expected = _brute_precision_recall(real, fake)
    got = precision_recall(real, fake)
    assert (got["precision"], got["recall"]) == pytest.approx(expected, abs=1e-12)
    assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1  # a case that separates the two
    radii = knn_radii(real, 3, batch_size=7)  # batching does not change the answer (but float64 rounding: a batch of
    torch.testing.assert_close(radii, knn_radii(real, 3), rtol=1e-14, atol=0)  # 7 takes other matmul kernels on some CPUs)


def test_precision_recall_edge_cases():
    from ddpm.evaluation.metrics import precision_recall

    points = torch.randn(25, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert precision_recall(points, points.clone()) == {"precision": 1.0, "recall": 1.0}
    far = points + 1e3
    assert precision_recall(points, far) == {"precision": 0.0, "recall": 0.0}
    # half the generated points on the real ones, half far away: precision 1/2, recall 1 (every real point is covered)
    half = torch.cat([points, far])
    result = precision_recall(points, half)
    assert result["precision"] == 0.5 and result["recall"] == 1.0


def test_precision_and_recall_carry_their_sample_count_in_logged_names():
    from ddpm.training.sampling import sized

    assert sized({"fd_digits": 1, "precision": 0.9, "recall": 0.8, "diversity": 1.0}, 500) == \
        {"fd_digits_n500": 1, "precision_n500": 0.9, "recall_n500": 0.8, "diversity": 1.0}


BEFORE_API = Path(__file__).parent / "data" / "inference_before_api.json"
SAMPLE_FLAGS = ["sampler.steps=7", "num_samples=20", "guidance.scale=1.5", "seed=3", "trajectory=2", "device=cpu",
                "sampler.precision=float32"]


@classifier_group
def test_sample_and_evaluate_give_what_they_gave_before_the_python_api(cache_dir, tmp_path):
    """Issue 22's acceptance 3: since ``ddpm.sample`` and ``ddpm.evaluate`` go through ``ddpm.load`` and ``Pipeline.draw``,
    they draw the same images and measure the same numbers as the commit before (f777b58, which stored them in
    tests/data/inference_before_api.json), for every sampler; and the Python API gives exactly what the CLI gives."""
    from ddpm.core.guidance import Guidance
    from ddpm.inference import load

    before = json.loads(BEFORE_API.read_text())
    checkpoint = Path(__file__).parent / "data" / "checkpoint_before_core.ckpt"
    model = load(checkpoint, device="cpu")
    from ddpm.sample import sample

    for name, stored in before["samples"].items():  # ddpm.sample's task in this process (the command line: below)
        out = tmp_path / name
        sample(compose([f"ckpt_path={checkpoint}", f"sampler={name}", *SAMPLE_FLAGS], config_name="sample", output_dir=out))
        got = np.load(out / "samples.npz")
        assert got["images"].reshape(20, -1).tolist() == stored["images"], name
        assert got["labels"].tolist() == stored["labels"] and (out / "trajectory.png").is_file()
        images = model.sample(None, num_samples=20, sampler=name, steps=7, guidance=Guidance(1.5), seed=3)
        assert np.array_equal(to_uint8(images), got["images"]), name
    result = run_cli("ddpm.evaluate", f"ckpt_path={checkpoint}", "sampler=ddim", "sampler.steps=5", "num_samples=60",
                     "batch_size=25", "guidance.scale=1", "seed=1", "device=cpu", "sampler.precision=float32", "logger=none",
                     f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key, value in before["metrics"].items():
        # the digits classifier is retrained in this cache: the same to float32 rounding (threads), not bit for bit
        assert record["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # (premise changed, issue 19: the protocol also records guidance_method, which was always cfg before)
    assert record["protocol"]["guidance_method"] == "cfg"
    # (premise changed, issue 21: DDIM gained spacing, lambda_min and rho; at time, null, 7 it is the DDIM of before)
    sampler = record["protocol"]["sampler"]
    assert (sampler.pop("spacing"), sampler.pop("lambda_min"), sampler.pop("rho")) == ("time", None, 7.0)
    assert {k: v for k, v in record["protocol"].items() if k not in ("checkpoint", "guidance_method")} == before["protocol"]
    python = model.evaluate(60, sampler="ddim", steps=5, guidance=1.0, seed=1, batch_size=25, cache_dir=str(cache_dir))
    assert {k: python["metrics"][k] for k in before["metrics"]} == {k: record["metrics"][k] for k in before["metrics"]}


@classifier_group
def test_trainings_final_evaluation_records_each_w_with_ddpm_evaluates_protocol(cache_dir, tmp_path):
    """One metrics.json writer (evaluation/records.py): training's final evaluation writes one entry per w, each with
    the protocol ddpm.evaluate records (Pipeline.protocol), and the report's reader takes both shapes."""
    from ddpm.evaluation.records import evaluations

    cfg = compose([*[o for o in TINY if "evaluate_at_end" not in o], "trainer.max_steps=4", "~callbacks.sample_grid",
                   "callbacks.evaluate_at_end.num_samples=20", "callbacks.evaluate_at_end.guidance_scales=[0,1]",
                   "callbacks.evaluate_at_end.sampler.steps=3", f"callbacks.evaluate_at_end.cache_dir={cache_dir}"],
                  output_dir=tmp_path / "run")
    train(cfg)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [w for w, _ in evaluations(record)] == [0.0, 1.0] and record["global_step"] == 4
    for entry, w in zip(record["evaluations"], (0.0, 1.0)):
        protocol = entry["protocol"]
        assert protocol["guidance_scale"] == w and protocol["num_samples"] == 20 and protocol["weights"] == "ema"
        assert protocol["sampler"]["name"] == "dpmpp_2m" and protocol["sampler"]["steps"] == 3
        assert protocol["checkpoint"]["global_step"] == 4
        assert protocol["feature_extractor"]["name"] == "digits_classifier" and "fd_digits" in entry["metrics"]
    assert not list((tmp_path / "run").glob(".metrics.json*"))  # written atomically, no temporary left


# --- KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic kernel, against its formula (issue 33) ------------
def _mmd2_unbiased(x, y):
    """Gretton et al. 2012, eq. 3, written out with loops over pairs: k(a, b) = (a.b / d + 1)^3."""
    d = x.shape[1]
    k = lambda a, b: (float(a @ b) / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_on_whole_sets_is_the_unbiased_mmd_formula():
    from ddpm.evaluation.metrics import kernel_distance

    g = torch.Generator().manual_seed(0)
    real = torch.randn(25, 4, generator=g, dtype=torch.float64)
    fake = 0.8 * torch.randn(25, 4, generator=g, dtype=torch.float64) + 0.5
    mean, std = kernel_distance(real, fake, subsets=3, subset_size=1000)  # every subset is the whole set
    assert mean == pytest.approx(_mmd2_unbiased(real, fake), rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_kid_is_unbiased_where_a_frechet_distance_is_not():
    """Two samples of one distribution: KID's mean over many subsets is about 0 (it can go negative), while the
    Fréchet distance of a small sample sits far above 0; a shifted distribution scores clearly above both spreads."""
    from ddpm.evaluation.metrics import kernel_distance

    g = torch.Generator().manual_seed(1)
    real = torch.randn(2000, 8, generator=g, dtype=torch.float64)
    same = torch.randn(200, 8, generator=g, dtype=torch.float64)
    shifted = same + 0.5
    mean, std = kernel_distance(real, same, subsets=50, subset_size=200)
    assert abs(mean) < 3 * std / 50 ** 0.5 + 1e-3
    mean_shifted, std_shifted = kernel_distance(real, shifted, subsets=50, subset_size=200)
    assert mean_shifted > 10 * (abs(mean) + std) and std_shifted > 0
    assert kernel_distance(real, shifted, subsets=5, seed=3) == kernel_distance(real, shifted, subsets=5, seed=3)
    with pytest.raises(ValueError, match="at least 2"):
        kernel_distance(real, same[:1])


def test_kid_is_named_by_its_feature_space():
    from ddpm.evaluation.registry import metric

    class Named(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

    assert [metric_name(Named(n), "kid") for n in ("inception_v3", "digits_classifier", "fashion")] == \
        ["kid", "kid_digits", "kid_fashion"]
    assert metric("kid_fashion").lower_is_better and not metric("kid_fashion").sized
    assert metric("kid_fashion_std").lower_is_better is None and metric("kid_std").lower_is_better is None
