"""A checkpoint is data: a file that passes torch.load(weights_only=True) must still never choose what code runs.

Each payload below is a checkpoint a stranger could send: a valid ddpm checkpoint whose config names other callables
(the attacks of issue 11), one per place a target can hide. Every entry point refuses it with one line naming the key
and the target, before anything is built, and nothing the payload would do happens."""

import copy
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_cli

from ddpm.inference import load as load_module
from ddpm.checkpoints import load_checkpoint, rebuild_config
from ddpm.options import shipped_targets
from ddpm.config import compose
from ddpm.train import train
from ddpm.validation import ConfigError


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    run = tmp_path_factory.mktemp("genuine")
    train(compose([*TINY, "trainer.max_steps=2", "~callbacks.sample_grid"], output_dir=run))
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


def payloads(tmp):
    """(name, key path to replace, node, the key the refusal must name, the target it must name)."""
    victim, made = tmp / "victim" / "last.ckpt", tmp / "made_by_payload"
    hub = {"_target_": "torch.hub.load", "repo_or_dir": str(tmp), "model": "x", "source": "local", "trust_repo": True}
    return [
        ("makedirs+savetxt+hub", "sampler", {"_target_": "builtins.dict",
                                             "a": {"_target_": "os.makedirs", "name": str(made)},
                                             "b": {"_target_": "numpy.savetxt", "fname": str(tmp / "hubconf.py"), "X": [1]},
                                             "c": hub}, "sampler._target_", "builtins.dict"),
        ("open-truncates", "model", {"_target_": "builtins.open", "file": str(victim), "mode": "w"}, "model._target_", "builtins.open"),
        ("hub-load", "schedule", hub, "schedule._target_", "torch.hub.load"),
        ("nested-under-model", "model.extra", {"_target_": "builtins.open", "file": str(victim), "mode": "w"},
         "model.extra._target_", "builtins.open"),
        ("hidden-in-callbacks", "callbacks.x", {"_target_": "os.system", "command": f"touch {made}"}, "callbacks.x._target_", "os.system"),
        ("data-exec", "data", {"_target_": "builtins.exec", "source": f"open({str(made)!r}, 'w')"}, "data._target_", "builtins.exec"),
        ("optimizer-eval", "optim.optimizer", {"_target_": "builtins.eval", "_partial_": True}, "optim.optimizer._target_", "builtins.eval"),
        ("our-target-wrong-group", "model", {"_target_": "ddpm.data.Digits"}, "model._target_", "ddpm.data.Digits"),
        ("interpolation", "data.root", "${oc.decode:'{_target_: os.system, command: touch x}'}", "data.root", "interpolation"),
    ]


def _write(genuine, tmp, key, node):
    checkpoint = copy.deepcopy(genuine)
    parent = checkpoint["config"]
    *parents, last = key.split(".")
    for part in parents:
        parent = parent[part]
    parent[last] = node
    path = tmp / "payload.ckpt"
    torch.save(checkpoint, path)
    torch.load(path, weights_only=True)  # the attack passes the weights_only gate
    return path


def _untouched(tmp):
    victim = tmp / "victim" / "last.ckpt"
    return victim.read_bytes() == b"another run's checkpoint" and not (tmp / "made_by_payload").exists() \
        and not (tmp / "hubconf.py").exists()


@pytest.mark.parametrize("index", range(9), ids=[p[0] for p in payloads(Path("."))])
def test_every_entry_point_refuses_the_payload_before_building_anything(genuine, tmp_path, index):
    from ddpm.evaluate import evaluate
    from ddpm.sample import sample

    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "last.ckpt").write_bytes(b"another run's checkpoint")
    _, key, node, named_key, named_target = payloads(tmp_path)[index]
    path = _write(genuine, tmp_path, key, node)

    attempts = [
        lambda: load_module(path),
        lambda: sample(compose([f"ckpt_path={path}", "num_samples=2"], config_name="sample", output_dir=tmp_path / "s")),
        lambda: evaluate(compose([f"ckpt_path={path}", "num_samples=2"], config_name="evaluate", output_dir=tmp_path / "e")),
        lambda: train(compose([*TINY, f"ckpt_path={path}", "trainer.max_steps=3"], output_dir=tmp_path / "t")),
    ]
    for attempt in attempts:
        with pytest.raises(ConfigError) as error:
            attempt()
        message = str(error.value)
        assert "\n" not in message and "payload.ckpt" in message, message
        assert named_key in message and named_target in message, message
        assert _untouched(tmp_path)
    assert not (tmp_path / "s" / "samples.npz").exists() and not (tmp_path / "e" / "metrics.json").exists()
    assert not list((tmp_path / "t").rglob("*.ckpt")) if (tmp_path / "t").exists() else True


def test_the_cli_refuses_with_one_line_and_exit_2(genuine, tmp_path):
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "last.ckpt").write_bytes(b"another run's checkpoint")
    _, key, node, named_key, _ = payloads(tmp_path)[0]
    path = _write(genuine, tmp_path, key, node)
    result = run_cli("ddpm.sample", f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("error: ") == 1 and named_key in result.stderr
    assert _untouched(tmp_path) and not (tmp_path / "out" / "samples.npz").exists()


def test_genuine_checkpoints_and_every_shipped_option_pass(genuine):
    """Premise changed (issue 20): the trust check is now a recomposition (``rebuild_config``), which must give back every
    genuine config, preset and option unchanged."""
    from omegaconf import OmegaConf

    assert rebuild_config(genuine["config"], "genuine", genuine["choices"]) == genuine["config"]
    allowed = shipped_targets()
    assert "ddpm.core.unet.UNet" in allowed["model"] and "ddpm.core.schedules.cosine_betas" in allowed["schedule"]
    # premise changed (issue 30): a sampler is a class whose fields are its keys, not a function built as a partial
    assert allowed["sampler"] >= {"ddpm.core.samplers.ddpm.DDPMSampler", "ddpm.core.samplers.ddim.DDIM",
                                  "ddpm.core.samplers.dpmpp_2m.DPMSolverPP2M"}
    assert allowed["optim"] == {"torch.optim.AdamW"}
    assert "builtins.open" not in allowed["*"]
    presets = sorted(p.stem for p in (Path(__file__).parents[1] / "experiments").glob("*.yaml"))
    for overrides in (["model=unet_cifar10"], ["schedule=cosine"], ["sampler=ddim"], ["sampler=dpmpp_2m"], ["sampler=heun"],
                      ["data=cifar10"], ["data=mnist"], ["data=fashion_mnist"], ["logger=wandb_csv"], ["trainer=ddp_cpu"],
                      *[[f"experiments={p}"] for p in presets]):
        cfg = compose(overrides, output_dir="/tmp/unused")
        config = OmegaConf.to_container(cfg, resolve=True)
        # with the choices recorded (today's checkpoints) and inferred (those from before choices were recorded)
        from hydra.core.hydra_config import HydraConfig
        from ddpm.training.checkpoint import recorded_choices

        assert HydraConfig.initialized()
        assert rebuild_config(config, str(overrides), recorded_choices()) == config, overrides
        assert rebuild_config(config, str(overrides)) == config, overrides


def test_a_dotted_key_cannot_hide_a_target(genuine, tmp_path):
    """Issue 20's reproduction: a literal key "optim.optimizer" beside the real optim.optimizer node."""
    made = tmp_path / "made_by_payload"
    checkpoint = copy.deepcopy(genuine)
    checkpoint["config"]["optim"]["optimizer"] = {"_target_": "builtins.open", "file": str(made), "mode": "w"}
    checkpoint["config"]["optim.optimizer"] = {"_target_": "torch.optim.AdamW"}
    path = tmp_path / "evil.ckpt"
    torch.save(checkpoint, path)
    result = run_cli("ddpm.sample", f"ckpt_path={path}", "num_samples=2", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path,
                     timeout=120)
    assert result.returncode == 2 and result.stderr.count("error: ") == 1, result.stderr[-2000:]
    assert "builtins.open" in result.stderr and not made.exists() and not (tmp_path / "out" / "samples.npz").exists()
    checkpoint["config"]["optim"]["optimizer"] = copy.deepcopy(genuine["config"]["optim"]["optimizer"])
    torch.save(checkpoint, path)  # the dotted key alone: not a key of this project's config
    with pytest.raises(ConfigError, match=r"'optim.optimizer' under the config is not a plain identifier"):
        load_module(path)


@pytest.mark.parametrize("choices,message", [
    ({"model": "builtins"}, "model='builtins' is not one of this project's options"),
    ({"model": "../data/digits"}, "is not one of this project's options"),
    ({"hydra/launcher": "submitit_slurm"}, "which is not a config group"),
    ({"experiments": "quick"}, "which is not a config group"),
    (["model=unet_tiny"], "not a mapping"),
])
def test_recorded_choices_are_options_of_conf(genuine, choices, message):
    with pytest.raises(ConfigError, match=message):
        rebuild_config(genuine["config"], "ckpt_path='x.ckpt'", choices)


def test_a_choice_that_differs_from_the_stored_target_is_refused(genuine):
    """The recorded choice picks the option, the stored _target_ must be that option's: model=unet_cifar10 with a UNet
    passes, schedule=cosine with linear's betas function is refused naming both."""
    choices = dict(genuine["choices"], schedule="cosine")
    with pytest.raises(ConfigError, match=r"schedule._target_='ddpm.core.schedules.linear_betas' is not one of"):
        rebuild_config(genuine["config"], "ckpt_path='x.ckpt'", choices)


class Pickled:
    """Any class: a plain pickle of it names a Python callable that unpickling would import and call."""


def test_weights_only_refusal_says_why_in_full(tmp_path):
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "config": {}, "obj": Pickled()}, path)
    with pytest.raises(ConfigError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message and "refused" in message and "could run code" in message and "trust its source" in message


def test_old_checkpoints_load_through_the_upgrade_map_or_are_refused_in_one_line(tmp_path):
    """A checkpoint from before recorded choices (tests/data, commit 3839586: old module paths, no diffusion node) is
    rebuilt with inferred choices; the same file with a key today's conf/ does not have is refused, in one line."""
    old = torch.load(Path(__file__).parent / "data" / "checkpoint_before_core.ckpt", weights_only=True)
    assert "choices" not in old
    rebuilt = rebuild_config(old["config"], "old")
    assert rebuilt["model"]["_target_"] == "ddpm.core.unet.UNet" and rebuilt["diffusion"]["prediction"] == "eps"
    assert rebuilt["trainer"]["plugins"] == [{"_target_": "ddpm.training.checkpoint.AtomicCheckpointIO"}]
    retired = copy.deepcopy(old)
    retired["config"]["sampler"]["clip_denoised"] = True  # an option no sampler of conf/ has
    path = tmp_path / "retired.ckpt"
    torch.save(retired, path)
    with pytest.raises(ConfigError) as error:
        load_module(path)
    assert "\n" not in str(error.value) and "config key sampler.clip_denoised is not a key of this project's config" in str(error.value)


def test_a_config_that_contains_itself_or_is_too_deep_is_refused(genuine, tmp_path):
    """A weights_only load keeps pickle's shared references: a mapping can contain itself, which a recursive walk
    followed until RecursionError."""
    cyclic = copy.deepcopy(genuine)
    cyclic["config"]["model"]["loop"] = cyclic["config"]
    path = tmp_path / "cyclic.ckpt"
    torch.save(cyclic, path)
    assert torch.load(path, weights_only=True)["config"]["model"]["loop"]["model"]["loop"] is not None
    with pytest.raises(ConfigError, match="its config contains itself"):
        load_module(path)
    deep = copy.deepcopy(genuine)
    node = deep["config"]["model"]
    for _ in range(40):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(ConfigError, match="deeper than 32 levels"):
        rebuild_config(deep["config"], "deep.ckpt")


@pytest.mark.parametrize("step", ["4", -1, 2.5, True, None])
def test_a_checkpoint_whose_step_is_not_a_count_is_refused(genuine, tmp_path, step):
    bad = copy.deepcopy(genuine)
    bad["global_step"] = step
    path = tmp_path / "step.ckpt"
    torch.save(bad, path)
    with pytest.raises(ConfigError, match="its global_step is .*, not a step count"):
        load_checkpoint(path)


def test_a_checkpoint_whose_values_or_weights_do_not_make_its_model_is_refused(genuine, tmp_path):
    bad = copy.deepcopy(genuine)
    bad["config"]["model"]["base_channels"] = -3
    path = tmp_path / "values.ckpt"
    torch.save(bad, path)
    with pytest.raises(ConfigError, match=r"its config holds model.base_channels=-3: must be an integer > 0"):
        load_module(path)
    bad = copy.deepcopy(genuine)
    bad["state_dict"] = {k: v[..., :1] if v.ndim else v for k, v in bad["state_dict"].items()}
    torch.save(bad, path)
    with pytest.raises(ConfigError, match=r"its weights do not fit the model its config describes"):
        load_module(path)
