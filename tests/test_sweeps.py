"""Ablations as sweeps: presets, the local and submitit launchers, SLURM settings tied to the trainer, DDP on
CPU, the report, and wandb grouping."""

import csv
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_cli
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from ddpm.options import config_dir

# Tiny runs, tiny final evaluations; the digits classifier is cached per test session in DDPM_CACHE.
QUICK = [o for o in TINY if not o.startswith("~callbacks.evaluate_at_end")] + [
    "callbacks.evaluate_at_end.num_samples=20", "callbacks.evaluate_at_end.sampler.steps=4",
    "callbacks.evaluate_at_end.guidance_scales=[0,2]", "trainer.max_steps=8",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "DDPM_CACHE": str(cache)}


@pytest.mark.xdist_group("digits_classifier")
def test_digits_quick_sweep_then_report(tmp_path, env):
    sweep = tmp_path / "sweep"
    result = run_cli("ddpm.train", "--multirun", "experiments=digits_quick", *QUICK, "seed=0,1",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 4  # schedule=linear,cosine (from the preset) x seed=0,1 (from the command line)
    assert all((job / "metrics.json").is_file() and (job / "checkpoints" / "last.ckpt").is_file() for job in jobs)

    report = run_cli("ddpm.report", str(sweep), cwd=tmp_path, env=env, timeout=120)
    assert report.returncode == 0, report.stderr[-3000:]
    rows = list(csv.DictReader(open(sweep / "runs.csv")))
    assert len(rows) == 4 and {r["schedule"] for r in rows} == {"linear", "cosine"} and {r["seed"] for r in rows} == {"0", "1"}
    assert all(float(r["final_loss"]) > 0 and float(r["fd_digits"]) > 0 for r in rows)
    guidance = list(csv.DictReader(open(sweep / "guidance.csv")))
    assert len(guidance) == 2 * 2 and all(g["seeds"] == "2" for g in guidance)  # 2 schedules x 2 scales, mean of 2 seeds
    assert (sweep / "loss_curves.png").stat().st_size > 1000 and (sweep / "quality_vs_guidance.png").stat().st_size > 1000
    assert "## Findings" in report.stdout and "schedule=" in report.stdout


def test_submitit_local_runs_jobs(tmp_path, env):
    sweep = tmp_path / "sweep"
    result = run_cli("ddpm.train", "--multirun", "hydra/launcher=submitit_local", *TINY, "trainer.max_steps=3",
                     "~callbacks.sample_grid", "seed=0,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        checkpoint = torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=True)
        assert checkpoint["global_step"] == 3 and checkpoint["config"]["seed"] == int(job)
    assert list((sweep / ".submitit").iterdir())  # submitit's own job folders: it really went through submitit


def test_slurm_launcher_follows_the_trainer():
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose("train", ["hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.devices=4",
                                      "trainer.num_nodes=2", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["partition"] == "gpu"
    assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == 4 and launcher["nodes"] == 2
    assert launcher["max_num_timeout"] > 0  # timed-out jobs are requeued (submitit's default 0 would not)


def test_slurm_launcher_cfg_hydra_cli(tmp_path):
    # `--cfg all`: the launcher's keys point into the trainer's, so they resolve only next to the job config.
    result = run_cli("ddpm.train", "hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.devices=2", "--cfg", "all",
                     "--resolve", cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    launcher = OmegaConf.create(result.stdout).hydra.launcher
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (2, 2, 1)


def test_ddp_strategy_follows_slurm(monkeypatch):
    from ddpm.config import ddp_strategy

    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert ddp_strategy() == "ddp_spawn"
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert ddp_strategy() == "ddp"


def test_two_process_cpu_ddp_writes_each_checkpoint_once(tmp_path):
    run = tmp_path / "run"
    result = run_cli("ddpm.train", *TINY, "trainer=ddp_cpu", "trainer.enable_progress_bar=false", "trainer.max_steps=4", "callbacks.model_checkpoint.every_n_train_steps=2",
                     f"hydra.run.dir={run}", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == ["last.ckpt", "step_0000002.ckpt", "step_0000004.ckpt"]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4 and checkpoint["config"]["trainer"]["devices"] == 2
    assert (run / "samples" / "final.png").is_file()


def test_wandb_group_and_name_come_from_the_sweep(tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from ddpm.training.loggers import sweep_identity

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose("train", ["schedule=cosine", "seed=1"], return_hydra_config=True)
    cfg.hydra.mode = RunMode.MULTIRUN
    cfg.hydra.runtime.output_dir = str(tmp_path / "multirun" / "2026-11-30" / "12-00-00" / "3")
    HydraConfig.instance().set_config(cfg)
    group, name, overrides = sweep_identity("schedule_ablation")
    assert group == "schedule_ablation/2026-11-30_12-00-00"
    assert name == "schedule=cosine,seed=1" and overrides == {"schedule": "cosine", "seed": "1"}


def _fake_sweep(root, runs):
    """A sweep directory as ddpm.train/evaluate write it: per job overrides and a metrics.json."""
    import json

    for i, (overrides, evaluations) in enumerate(runs):
        job = root / str(i)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        (job / "metrics.json").write_text(json.dumps({"global_step": 10, "final_loss": 0.1, "evaluations": [
            {"guidance_scale": w, "metrics": {"fd_digits": fd}} for w, fd in evaluations]}))
    return root


def test_report_labels_each_row_with_its_own_w_and_says_one_seed_has_no_statistics(tmp_path):
    """An evaluate sweep over w: each Runs row shows the w it was measured at; one seed per setting: no finding."""
    import json

    from ddpm.report import build_report

    sweep = tmp_path / "sweep"
    for i, w in enumerate((0.0, 1.0, 2.0)):
        job = sweep / str(i)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- ckpt_path=x.ckpt\n- guidance.scale={w}\n")
        (job / "metrics.json").write_text(json.dumps({"metrics": {"fd_digits": 10.0 + w},
                                                      "protocol": {"guidance_scale": w}}))
    text = build_report(sweep)
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()][:3]
    assert [row.split("|")[4].strip() for row in rows] == ["0", "1", "2"], rows  # the w column, one per row
    assert "fd_digits (w=" not in text  # the old header named one w for every row

    single = _fake_sweep(tmp_path / "single", [(["schedule=linear"], [(1.0, 30.0)]), (["schedule=cosine"], [(1.0, 30.03)])])
    text = build_report(single)
    assert "1 seed: no statistics" in text and "2 standard errors 0" not in text and "no clear difference" not in text


def test_report_says_where_loss_curves_are_when_only_wandb_has_them(tmp_path):
    from ddpm.report import build_report

    sweep = _fake_sweep(tmp_path / "sweep", [(["seed=0"], [(1.0, 30.0)]), (["seed=1"], [(1.0, 31.0)])])
    (sweep / "0" / "wandb").mkdir()
    text = build_report(sweep)
    assert "logged the loss to wandb only" in text and not (sweep / "loss_curves.png").exists()


def _evaluation_grid(root, fd):
    """An evaluation sweep over 3 checkpoints x sampler x sampler.steps, as ddpm.evaluate --multirun writes it."""
    import json

    import yaml

    job = 0
    for checkpoint in ("a", "b", "c"):
        for sampler in ("dpmpp_2m", "heun"):
            for steps in (10, 20):
                (root / str(job) / ".hydra").mkdir(parents=True)
                (root / str(job) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
                    [f"ckpt_path=/runs/{checkpoint}/last.ckpt", f"sampler={sampler}", f"sampler.steps={steps}"]))
                (root / str(job) / "metrics.json").write_text(json.dumps(
                    {"protocol": {"guidance_scale": 1.0}, "metrics": {"fd_digits": fd(checkpoint, sampler, steps)}}))
                job += 1


def test_report_draws_an_evaluation_grid_and_pairs_on_the_checkpoint(tmp_path):
    """dpmpp_2m at 20 steps is best by 1.0 on every checkpoint, which differ from each other by 5: paired on the
    checkpoint the gap is clear; unpaired (Welch) it would be lost in the spread between checkpoints."""
    offsets = {"a": 0.0, "b": 5.0, "c": 10.0}
    noise = {("a", "heun", 20): 0.1, ("b", "heun", 20): -0.1, ("c", "heun", 20): 0.05}
    _evaluation_grid(tmp_path, lambda c, s, n: 30 + offsets[c] + (0 if (s, n) == ("dpmpp_2m", 20) else 1 + 3 * (n == 10))
                     + noise.get((c, s, n), 0.0))
    result = run_cli("ddpm.report", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "grid.png").is_file()
    best = next(line for line in result.stdout.splitlines() if line.startswith("Best cell"))
    assert best.startswith("Best cell: sampler=dpmpp_2m, sampler.steps=20: fd_digits 35.00 ± 5.00")
    assert "runner-up, sampler=heun, sampler.steps=20" in best and "a difference at 95% (paired t-test, n = 3" in best


def test_report_pairs_an_evaluation_sweep_over_w_on_the_checkpoint(tmp_path):
    """ema.sigma_rel x guidance.scale over 3 checkpoints: each cell's statistics use all 3 checkpoints at its own w
    (several runs share a checkpoint, one per w)."""
    import json

    import yaml

    job = 0
    for checkpoint, offset in (("a", 0.0), ("b", 4.0), ("c", 8.0)):
        for sigma_rel in (0.05, 0.1):
            for w in (0, 1):
                (tmp_path / str(job) / ".hydra").mkdir(parents=True)
                (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
                    [f"ema.sigma_rel={sigma_rel}", f"guidance.scale={w}", f"ckpt_path=/runs/{checkpoint}.ckpt"]))
                fd = 30 + offset + 10 * w + (1.0 if sigma_rel == 0.05 else 0.0) + 0.01 * job
                (tmp_path / str(job) / "metrics.json").write_text(json.dumps(
                    {"protocol": {"guidance_scale": float(w)}, "metrics": {"fd_digits": fd}}))
                job += 1
    result = run_cli("ddpm.report", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for w in (0, 1):
        line = next(x for x in result.stdout.splitlines() if x.startswith(f"- fd_digits at w={w}: "))
        assert "ema.sigma_rel=0.1 is better" in line and "paired t-test, n = 3" in line, line
    assert "Best cell: ema.sigma_rel=0.1, w=0.0" in result.stdout and "95% CI of the mean" in result.stdout


# --- the report's files are its own; a file it cannot read is one line (issue 20) ---------------------------------
def test_report_replaces_a_symlinked_output_and_escapes_formula_cells(tmp_path):
    from ddpm.report import main

    sweep = _fake_sweep(tmp_path / "sweep", [([f"schedule=linear", "seed=0", "+note==HYPERLINK(\"x\")"], [(1.0, 30.0)]),
                                             ([f"schedule=cosine", "seed=0", "+note=@SUM(A1)"], [(1.0, 25.0)])])
    target = tmp_path / "precious.txt"
    target.write_text("mine")
    (sweep / "runs.csv").symlink_to(target)
    main([str(sweep)])
    assert target.read_text() == "mine" and not (sweep / "runs.csv").is_symlink()
    cells = [cell for row in csv.reader(open(sweep / "runs.csv")) for cell in row]
    assert "'=HYPERLINK(\"x\")" in cells and "'@SUM(A1)" in cells
    assert not [c for c in cells if c.startswith(("=", "+", "@")) or (c.startswith("-") and not _number(c))]
    assert not list(sweep.glob(".*.tmp"))


def _number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


BAD_SWEEP_FILES = [
    ("non-UTF-8 csv", "0/csv/version_0/metrics.csv", b"step,train/loss\n1,\xff\xfe\n", "not UTF-8"),
    ("bad yaml", "0/.hydra/overrides.yaml", b"- a: [\n", "cannot be parsed"),
    ("python tag", "0/.hydra/overrides.yaml", b"- !!python/object/apply:os.system ['touch x']\n", "cannot be parsed"),
    ("string metric", "0/metrics.json", b'{"evaluations": [{"guidance_scale": 1, "metrics": {"fd_digits": "low"}}]}',
     "where a number belongs"),
    ("not json", "0/metrics.json", b"{", "cannot be parsed"),
]


@pytest.mark.parametrize("relative,content,message", [b[1:] for b in BAD_SWEEP_FILES], ids=[b[0] for b in BAD_SWEEP_FILES])
def test_report_names_a_file_it_cannot_read_in_one_line(tmp_path, relative, content, message):
    sweep = _fake_sweep(tmp_path / "sweep", [(["seed=0"], [(1.0, 30.0)]), (["seed=1"], [(1.0, 31.0)])])
    (sweep / relative).parent.mkdir(parents=True, exist_ok=True)
    (sweep / relative).write_bytes(content)
    result = run_cli("ddpm.report", str(sweep), cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert message in result.stderr and relative.split("/")[-1] in result.stderr
    assert not (tmp_path / "x").exists()


def test_report_whose_write_fails_is_one_line(tmp_path, monkeypatch, capsys):
    """A read-only directory (EACCES from every create: root ignores a folder's mode bits, so the refusal is planted)."""
    import ddpm.files
    from ddpm.report import main

    sweep = _fake_sweep(tmp_path / "sweep", [(["seed=0"], [(1.0, 30.0)]), (["seed=1"], [(1.0, 31.0)])])

    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(ddpm.files, "_create", refuse)
    with pytest.raises(SystemExit) as exit_info:
        main([str(sweep)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "could not write report file" in err and "Permission denied" in err



@pytest.mark.parametrize("trainer,gpus,cpus,mem", [("cpu", None, 4, 16), ("ddp_cpu", None, 4, 16), ("debug", None, 4, 16),
                                                  ("gpu", 1, 8, 64), ("ddp", 4, 8, 64)])
def test_slurm_launcher_asks_for_what_the_trainer_uses(trainer, gpus, cpus, mem):
    """Issue 18's CPU partition: the default trainer once asked sbatch for gpus_per_node=1, which a node without GPUs
    refuses ("Invalid generic resource (gres) specification"). CPUs per task and memory follow the trainer too."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose("train", ["hydra/launcher=submitit_slurm", f"trainer={trainer}"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["gpus_per_node"] == gpus and launcher["tasks_per_node"] == cfg.trainer.devices
    assert (launcher["cpus_per_task"], launcher["mem_gb"]) == (cpus, mem)


@pytest.mark.parametrize("sbatch,key", [
    ("sbatch: error: Batch job submission failed: Invalid generic resource (gres) specification", "gpus_per_node"),
    ("sbatch: error: invalid partition specified: gpu\nsbatch: error: Batch job submission failed: Invalid partition name specified", "partition"),
    ("sbatch: error: Batch job submission failed: Requested node configuration is not available", "mem_gb"),
    ("sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified", "account"),
])
def test_an_sbatch_refusal_is_one_line_naming_the_launcher_key(sbatch, key):
    import subprocess

    from ddpm.launchers import sbatch_error_line

    error = subprocess.CalledProcessError(1, ["sbatch", "x.sh"], output=sbatch.replace("\\n", "\n").encode())
    line = sbatch_error_line(error)
    assert line is not None and "\n" not in line and f"hydra.launcher.{key}" in line.replace("/ ", "/ hydra.launcher.")
    assert line.startswith("sbatch refused the sweep's jobs (")
    assert sbatch_error_line(RuntimeError("something else")) is None


def test_every_cell_of_every_evaluation_preset_is_a_valid_evaluation():
    """Each evaluations=NAME preset's grid, cell by cell as Hydra's sweeper expands it, passes ddpm.evaluate's checks
    (a sweep holding a refused combination, e.g. CFG++ with a sampler it is not defined for, would fail job by job)."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from ddpm.config import compose
    from ddpm.options import experiments_root
    from ddpm.validation import validate

    stored = Path(__file__).parent / "data" / "checkpoint_before_core.ckpt"
    files = sorted((experiments_root() / "evaluations").glob("*.yaml"))
    assert "guidance_methods" in [f.stem for f in files]
    for path in files:
        sweep = OmegaConf.to_container(OmegaConf.load(path).hydra.sweeper.params)
        parsed = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in sweep.items()])
        axes = [[f"{o.get_key_element()}={v}" for v in (o.sweep_string_iterator() if o.is_sweep_override()
                                                         else [o.get_value_element_as_str()])] for o in parsed]
        for cell in itertools.product(*axes):
            validate(compose([f"evaluations={path.stem}", f"ckpt_path={stored}", *cell], config_name="evaluate"), "evaluate")
