"""The promise of ``rebuild_config``, as a property: whatever config a checkpoint carries, the config the loader would
build from holds only callables that this project ships in conf/, each at the place its own option puts it; or the
loader refuses in one line. Nothing is built or called here: the property is checked on the rebuilt config.

Hostile configs are a genuine one with payloads planted at random depths and groups: nodes with foreign ``_target_``s,
``_partial_``/``_args_``, dotted, integer, empty and look-alike keys, lists, interpolations and resolvers, and keys
that duplicate a real path. `make test` runs a few hundred; the `slow` mark runs 10,000."""

import copy
import functools

import pytest
import torch
from conftest import TINY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from ddpm.config import compose
from ddpm.core.errors import ConfigError
from ddpm.checkpoints import CHOSEN_GROUPS, rebuild_config
from ddpm.options import shipped_targets, targets as _targets
from ddpm.training.checkpoint import recorded_choices


@functools.cache
def genuine() -> tuple[dict, dict]:
    cfg = compose(TINY, output_dir="/tmp/ddpm-property-test")
    return OmegaConf.to_container(cfg, resolve=True), recorded_choices()


def node_paths(node, prefix=()):
    """Every path to a mapping in the config (where a payload can be planted), the root included."""
    out = [prefix]
    for key, value in node.items():
        if isinstance(value, dict):
            out += node_paths(value, (*prefix, key))
    return out


EVIL = ["builtins.open", "builtins.exec", "builtins.eval", "os.system", "os.makedirs", "numpy.savetxt", "torch.hub.load",
        "torch.load", "subprocess.run", "shutil.rmtree", "functools.partial",
        # this project's own callables, at places their options do not put them
        "ddpm.data.Digits", "ddpm.core.unet.UNet", "torch.optim.AdamW", "lightning.Trainer"]
HOSTILE_KEYS = ["_target_", "_partial_", "_args_", "_recursive_", "_convert_", "optim.optimizer", "model._target_",
                "sampler._target_", "", " ", "0", "_tаrget_", "ｍodel", "model ", "model\n", "__class__", "${x}"]
INTERPOLATIONS = ["${oc.decode:'{_target_: os.system, command: touch x}'}", "${oc.env:HOME}", "${model}", "${now:%Y}",
                  "${hydra:runtime.output_dir}", "${oc.create:{_target_: builtins.open}}", "$${escaped}", "???"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=8),
                    st.sampled_from(INTERPOLATIONS), st.sampled_from(EVIL),
                    st.builds(torch.zeros, st.integers(0, 3)), st.binary(max_size=4))  # what weights_only also loads


def keys_for(real: list[str]):
    return st.one_of(st.sampled_from(real or ["x"]), st.sampled_from(HOSTILE_KEYS), st.integers(-2, 3), st.text(max_size=6))


def payloads(real_keys):
    def extend(children):
        target_node = st.builds(lambda target, extra: {"_target_": target, **extra}, st.sampled_from(EVIL),
                                st.dictionaries(keys_for(real_keys), children, max_size=3))
        return st.one_of(target_node, st.dictionaries(keys_for(real_keys), children, max_size=3),
                         st.lists(children, max_size=3))
    return st.recursive(scalars, extend, max_leaves=8)


@st.composite
def hostile(draw):
    config, choices = genuine()
    config = copy.deepcopy(config)
    all_keys = sorted({k for path in node_paths(config) for k in path} | set(config))
    paths = node_paths(config)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        parent = config
        for part in path:
            parent = parent[part] if isinstance(parent, dict) and isinstance(parent.get(part), dict) else parent
        if not isinstance(parent, dict):
            continue
        key = draw(keys_for(sorted(map(str, parent)) + all_keys))
        parent[key] = draw(payloads(all_keys))
    choice = draw(st.sampled_from(["recorded", "none", "one_changed", "hostile"]))
    if choice == "recorded":
        chosen = dict(choices)
    elif choice == "none":
        chosen = None
    elif choice == "one_changed":
        chosen = dict(choices, **{draw(st.sampled_from(["model", "schedule", "sampler", "data", "guidance", "logger"])):
                                  draw(st.sampled_from(["unet_cifar10", "cosine", "ddim", "heun", "mnist", "none", "csv"]))})
    else:
        chosen = draw(st.one_of(st.dictionaries(st.sampled_from([*CHOSEN_GROUPS, "hydra/launcher", "experiments", "x"]),
                                                st.sampled_from(["unet_tiny", "builtins", "../data/digits", "", "csv"]),
                                                max_size=3),
                                st.lists(st.text(max_size=4), max_size=2), st.text(max_size=4)))
    return config, chosen


def check_property(config, choices) -> None:
    try:
        rebuilt = rebuild_config(config, "ckpt_path='hostile.ckpt'", choices)
    except ConfigError as error:
        assert "\n" not in str(error) and "hostile.ckpt" in str(error)
        return
    allowed = shipped_targets()
    for path, target in _targets(rebuilt):
        group = path.split(".", 1)[0]
        assert isinstance(target, str) and target in allowed.get(group, allowed["*"]), (path, target)
    flat = repr(rebuilt)
    assert "${" not in flat.replace("$${", "")  # nothing left for a resolver to turn into a node


PROPERTY = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=300, **PROPERTY)
@given(hostile())
def test_a_rebuilt_config_holds_only_shipped_callables(case):
    check_property(*case)


@pytest.mark.slow
@settings(max_examples=10_000, **PROPERTY)
@given(hostile())
def test_a_rebuilt_config_holds_only_shipped_callables_10000(case):
    check_property(*case)


def test_the_property_can_fail():
    """The check itself catches a config built as it is (what the loader did before issue 20)."""
    config, _ = genuine()
    config = copy.deepcopy(config)
    config["model"]["_target_"] = "builtins.open"
    with pytest.raises(AssertionError):
        for path, target in _targets(config):
            assert target in shipped_targets().get(path.split(".", 1)[0], shipped_targets()["*"])


@pytest.mark.parametrize("value", [torch.zeros(0), torch.zeros(3), b"\x00"])
def test_a_tensor_where_a_value_belongs_is_refused_when_choices_are_inferred(value):
    """Found by the 10,000-example run: inferring the choices of a checkpoint without them compared a stored tensor
    with == (RuntimeError: Boolean value of Tensor ... is ambiguous) instead of refusing it."""
    import copy

    config = copy.deepcopy(genuine()[0])
    config["model"]["base_channels"] = value
    check_property(config, None)
    with pytest.raises(ConfigError, match="model.base_channels holds a"):
        rebuild_config(config, "ckpt_path='hostile.ckpt'")
