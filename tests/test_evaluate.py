"""The evaluation grid (adv_dpm.evaluate), the reproduction pipeline end to end at its smoke
preset (adv_dpm.reproduce), resuming it, and errors naming the bad argument."""
import copy
import csv
import json
import math

import pytest
import torch

from adv_dpm import cli
from adv_dpm.evaluate import SAMPLERS, evaluate, load_checkpoint
from adv_dpm.reproduce import mean_ci, paired, reproduce, verdict
from adv_dpm.train import TrainConfig, train
from adv_dpm.utils import read_checkpoint

TOY = dict(data="toy:gmm", model="toy2d", model_overrides={"hidden": 32, "depth": 2}, batch_size=16,
           diffusion_steps=100, log_interval=5, save_interval=1000, total_steps=20, ema_rate="0.9")


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("toy") / "run"
    train(TrainConfig(**TOY, run_dir=str(run)))
    return run / "checkpoint.pt"


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    """A private cache for the digits feature network (trained once for this module)."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("ADV_DPM_CACHE", str(path))
        yield path


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_channels_last_run_samples_in_channels_last(tmp_path):
    """load_checkpoint keeps the run's layout (NHWC convolutions: faster sampling on a CPU), with
    the samples of the same model in NCHW."""
    run = tmp_path / "run"
    train(TrainConfig(data="digits", model="digits-tiny", batch_size=8, total_steps=2, save_interval=1000,
                      diffusion_steps=100, ema_rate="0.9", channels_last=True, run_dir=str(run)))
    loaded = load_checkpoint(run / "checkpoint.pt")
    weights = [p for p in loaded.model.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    nchw = copy.deepcopy(loaded.model).to(memory_format=torch.contiguous_format)
    assert any(not p.is_contiguous() for p in weights) and all(p.is_contiguous() for p in nchw.parameters())
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = loaded.sample(x_T.shape, "ddim", 5, x_T=x_T)
        reference = loaded.sample(x_T.shape, "ddim", 5, model_fn=nchw, x_T=x_T)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_evaluate_writes_table_and_plots(toy_checkpoint, tmp_path):
    out = tmp_path / "eval"
    rows = evaluate(toy_checkpoint, samplers=SAMPLERS, nfes=[2, 5], num_samples=32, seed=3, out_dir=out,
                    exposure=True, robustness_budget=0.05, progress=False)
    assert [(r["sampler"], r["nfe"]) for r in rows] == [(s, n) for s in SAMPLERS for n in (2, 5)]
    table = read_csv(out / "results.csv")
    assert len(table) == 8
    for column in ("mode", "step", "data", "sampler", "nfe", "num_samples", "seed", "nll", "swd", "precision",
                   "recall", "modes", "modes_total", "exposure_ratio", "swd_random", "swd_adversarial", "seconds"):
        assert column in table[0], column
    assert all(math.isfinite(float(r["swd"])) for r in table)
    assert json.loads((out / "results.json").read_text())["settings"]["nfes"] == [2, 5]
    md = (out / "results.md").read_text()
    assert "| sampler | nfe |" in md and "![swd](swd_vs_nfe.png)" in md
    for metric in ("swd", "nll", "exposure_ratio", "swd_adversarial"):
        assert (out / f"{metric}_vs_nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp"))
    # deterministic given the seed ('auto' is the CPU here)
    again = evaluate(toy_checkpoint, samplers=["ddpm"], nfes=[5], num_samples=32, seed=3, progress=False,
                     device="auto" if not torch.cuda.is_available() else "cpu")
    assert again[0]["swd"] == rows[1]["swd"] and again[0]["nll"] == rows[1]["nll"]
    # the perturbed scoring in some samplers' cells only: the same scores there, none elsewhere
    some = evaluate(toy_checkpoint, samplers=SAMPLERS, nfes=[2, 5], num_samples=32, seed=3, robustness_budget=0.05,
                    robustness_samplers=["ddim"], progress=False, out_dir=tmp_path / "some")
    for row, full in zip(some, rows):
        assert ("swd_adversarial" in row) == (row["sampler"] == "ddim")
        assert row.get("swd_adversarial", full["swd_adversarial"]) == full["swd_adversarial"]
    with pytest.raises(ValueError, match="robustness_samplers: expected some of the samplers"):
        evaluate(toy_checkpoint, samplers=["ddpm"], nfes=[2], num_samples=8, robustness_budget=0.05,
                 robustness_samplers=["ddim"], progress=False)


def test_evaluate_bad_input_names_the_argument(toy_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        evaluate(tmp_path / "missing.pt", nfes=[5], progress=False)
    with pytest.raises(ValueError, match="samplers.*'euler'"):
        evaluate(toy_checkpoint, samplers=["ddim", "euler"], nfes=[5], progress=False)
    with pytest.raises(ValueError, match="nfes"):
        evaluate(toy_checkpoint, nfes=[5, 0], progress=False)
    with pytest.raises(ValueError, match="nfes"):
        evaluate(toy_checkpoint, nfes=[1000], progress=False)   # more steps than the schedule has
    with pytest.raises(ValueError, match="num_samples"):
        evaluate(toy_checkpoint, nfes=[5], num_samples=0, progress=False)
    with pytest.raises(SystemExit, match="checkpoint"):
        cli.main(["evaluate", str(tmp_path / "missing.pt")])
    # a run directory stands for its checkpoint
    assert read_checkpoint(toy_checkpoint.parent)["step"] == read_checkpoint(toy_checkpoint)["step"] > 0
    with pytest.raises(SystemExit, match="nfes"):
        cli.main(["evaluate", str(toy_checkpoint), "--nfes", "0"])
    # both comma-separated lists reach evaluate, which checks one against the other
    with pytest.raises(SystemExit, match=r"some of the samplers \['ddim', 'ddpm'\], got \['ddim', 'dpm_solver\+\+'\]"):
        cli.main(["evaluate", str(toy_checkpoint), "--samplers", "ddim,ddpm", "--nfes", "2", "--robustness", "0.05",
                  "--robustness-samplers", "ddim,dpm_solver++"])
    with pytest.raises(ValueError, match="preset"):
        reproduce("huge", out=tmp_path)
    with pytest.raises(ValueError, match="nfes"):
        reproduce("smoke", out=tmp_path, nfes=[0])
    with pytest.raises(ValueError, match="protocol"):
        reproduce("smoke", out=tmp_path, protocol="gan")


def test_statistics_over_seeds():
    mean, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and hi - mean == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert all(math.isnan(v) for v in mean_ci([1.0])[1:])
    better = paired([1.0, 1.1, 0.9], [2.0, 2.2, 1.9])   # free AT lower (better) on every seed
    assert better["diff"] < 0 and better["diff_hi"] < 0 and better["p"] < 0.05
    assert verdict(better, 3) == "better beyond the seed spread"
    assert verdict(paired([1.0, 3.0, 2.0], [2.0, 2.0, 2.0]), 3) == "no difference beyond the seed spread"
    assert verdict(paired([1.0], [2.0]), 1) == "cannot tell with one seed"
    # differences 1, 1, 2, 1: mean 1.25, se 0.25, t = 5 with 3 degrees of freedom
    c = paired([1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 1.0, 3.0])
    assert c["diff"] == pytest.approx(1.25) and c["p"] == pytest.approx(0.01539, abs=1e-4)
    assert (c["diff_lo"], c["diff_hi"]) == pytest.approx((1.25 - 3.1824463 * 0.25, 1.25 + 3.1824463 * 0.25))
    assert paired([2.0, 3.0], [1.0, 2.0])["p"] == 0.0   # the same non-zero difference on every seed
    assert paired([2.0, 3.0], [2.0, 3.0])["p"] == 1.0
    assert math.isnan(paired([2.0], [1.0])["p"])


def test_reproduce_reuses_a_finished_run_written_before_a_setting_existed_and_refuses_a_changed_one(tmp_path):
    import dataclasses
    from adv_dpm.reproduce import _train_job
    from adv_dpm.train import TrainConfig
    config = TrainConfig(run_dir=str(tmp_path / "run"), total_steps=5)
    saved = dataclasses.asdict(config)
    del saved["adv_cm_target"]   # a setting added since, at its default
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    (tmp_path / "run" / "done.json").write_text(json.dumps({"seconds": 1.5, "step": 5}))
    (tmp_path / "run" / "checkpoint.pt").touch()
    assert _train_job(config, print) == (1.5, False)
    with pytest.raises(ValueError, match=r"holds a run with other settings \(adv_cm_target, lr\)"):
        _train_job(dataclasses.replace(config, lr=0.5, adv_cm_target="consistent"), print)


@pytest.mark.slow
def test_reproduce_smoke_end_to_end_and_resume(tmp_path, feature_cache):
    out = tmp_path / "smoke"
    first = reproduce("smoke", out=out, nfes=[5, 8], progress=False)
    report = (out / "report.md").read_text()
    assert first["report"] == out / "report.md" and not first["skipped"]
    assert "adv-dpm reproduce --protocol dpm --preset smoke" in report
    assert "torch " in report and "## Wall time" in report
    assert "## Does free AT beat standard training?" in report
    for name in ("toy", "digits"):
        for nfe in (5, 8):
            assert f"- **{name}, NFE {nfe}** (ddpm" in report
        assert (out / "plots" / f"{name}_{'swd' if name == 'toy' else 'fd'}.png").is_file()
    assert "Feature network for digits: held-out accuracy" in report
    rows = read_csv(out / "results.csv")
    assert len(rows) == 2 * 5 * 4 * 2   # data sets x methods x samplers x NFEs (one seed)
    assert {r["method"] for r in rows} == {"standard", "ip", "free_at", "pgd_at", "replays"}
    assert {"swd", "fd", "kid", "exposure_ratio"} <= set(rows[0])
    comparisons = read_csv(out / "comparisons.csv")
    assert {c["baseline"] for c in comparisons} == {"standard", "DDPM-IP", "standard + ES", "PGD AT", "replays only"}
    assert "Against replays only (" in report
    # fine-tunes continue the pretrained weights for the same number of optimizer updates
    for method in ("standard", "ip", "free_at", "pgd_at", "replays"):
        config = json.loads((out / "digits" / "seed0" / method / "config.json").read_text())
        assert config["total_steps"] == 15 and config["init_from"].endswith("pretrain/checkpoint.pt")
        assert json.loads((out / "digits" / "seed0" / method / "done.json").read_text())["step"] == 15
    replays = json.loads((out / "toy" / "seed0" / "replays" / "config.json").read_text())
    assert (replays["mode"], replays["adv_steps"], replays["adv_lr"]) == ("free_at", 3, 0.0)   # free AT's replays, delta 0

    checkpoint = out / "toy" / "seed0" / "free_at" / "checkpoint.pt"
    stamp = checkpoint.stat().st_mtime_ns
    second = reproduce("smoke", out=out, nfes=[5, 8], progress=False)
    assert second["trained"] == [] and second["evaluated"] == [] and len(second["skipped"]) == 22
    assert checkpoint.stat().st_mtime_ns == stamp
    # an evaluation lost or cut off (as if killed, or copied in part) is redone, nothing else
    cut = out / "digits" / "seed0" / "ip" / "eval" / "results.json"
    cut.write_text(cut.read_text()[:100])
    third = reproduce("smoke", out=out, nfes=[5, 8], progress=False)
    assert third["trained"] == [] and third["evaluated"] == [str(out / "digits" / "seed0" / "ip" / "eval")]
    def scores(table):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in table]
    assert scores(read_csv(out / "results.csv")) == scores(rows)   # the redone evaluation is deterministic
    # with a robustness budget every evaluation is redone, scoring the DDIM cells under perturbed inputs too
    fourth = reproduce("smoke", out=out, nfes=[5, 8], progress=False, robustness=0.05)
    assert fourth["trained"] == [] and len(fourth["evaluated"]) == 10
    report = (out / "report.md").read_text()
    assert "--robustness 0.05" in report and "## Under adversarially perturbed network inputs (RMS 0.05" in report
    assert "- **digits, NFE 8** (ddim, fd_adversarial): free AT " in report
    comparisons = read_csv(out / "comparisons.csv")
    perturbed = [c for c in comparisons if c["metric"].endswith("_adversarial")]
    assert {c["sampler"] for c in perturbed} == {"ddim"}
    assert {c["baseline"] for c in perturbed} == {"standard", "DDPM-IP", "PGD AT", "replays only"}
    assert (out / "plots" / "toy_swd_adversarial.png").is_file()
    # a moved (or copied) folder resumes where it was: its runs' paths are not settings
    moved = out.rename(tmp_path / "moved")
    fifth = reproduce("smoke", out=moved, nfes=[5, 8], progress=False, robustness=0.05)
    assert fifth["trained"] == [] and fifth["evaluated"] == []
    # a finished run whose checkpoint was lost trains again (to the same weights: its evaluation stands)
    (moved / "toy" / "seed0" / "free_at" / "checkpoint.pt").unlink()
    sixth = reproduce("smoke", out=moved, nfes=[5, 8], progress=False, robustness=0.05)
    assert sixth["trained"] == [str(moved / "toy" / "seed0" / "free_at")] and sixth["evaluated"] == []



@pytest.mark.slow
def test_reproduce_consistency_protocol(tmp_path, feature_cache):
    out = tmp_path / "cm"
    result = reproduce("smoke", out=out, progress=False, protocol="cm")
    report = (out / "report.md").read_text()
    assert "adv-dpm reproduce --protocol cm --preset smoke" in report
    assert "## Does free AT help consistency distillation and consistency training?" in report
    assert "## Under adversarially perturbed network inputs (RMS 0.05 per element)" in report
    assert "- **digits, NFE 2** (consistency, fd_adversarial): CD + free AT " in report
    for name in ("toy", "digits"):
        for nfe in (1, 2):
            for label in ("CD + free AT", "CD + free AT (consistent)", "CT + free AT", "CT + free AT (consistent)"):
                assert f"- **{name}, NFE {nfe}** (consistency, {'swd' if name == 'toy' else 'fd'}): {label} " in report
    rows = read_csv(out / "results.csv")
    assert len(rows) == 2 * 6 * 2   # data sets x methods x NFEs (one sampler, one seed)
    assert {r["method"] for r in rows} == {"cd", "cd_free_at", "cd_free_at_consistent", "ct", "ct_free_at",
                                           "ct_free_at_consistent"}
    assert {r["sampler"] for r in rows} == {"consistency"}
    comparisons = read_csv(out / "comparisons.csv")
    assert {(c["method"], c["baseline"], c["metric"]) for c in comparisons if c["dataset"] == "digits"} == {
        (m, b, metric) for m, b in [("cd_free_at", "CD"), ("cd_free_at_consistent", "CD"), ("ct_free_at", "CT"),
                                    ("ct_free_at_consistent", "CT")] for metric in ("fd", "fd_adversarial")}
    assert all(math.isfinite(float(r["fd_adversarial"])) for r in rows if r["dataset"] == "digits")
    pretrained = str(out / "digits" / "pretrain" / "checkpoint.pt")
    for method, objective, mode, target in [("cd", "cd", "standard", "invariant"),
                                            ("cd_free_at", "cd", "free_at", "invariant"),
                                            ("cd_free_at_consistent", "cd", "free_at", "consistent"),
                                            ("ct", "ct", "standard", "invariant"),
                                            ("ct_free_at", "ct", "free_at", "invariant"),
                                            ("ct_free_at_consistent", "ct", "free_at", "consistent")]:
        config = json.loads((out / "digits" / "seed0" / method / "config.json").read_text())
        assert (config["objective"], config["mode"], config["adv_cm_target"]) == (objective, mode, target)
        # a distillation starts as its teacher, consistency training from the pretrained weights
        assert (config["teacher"], config["init_from"]) == ((pretrained, "") if objective == "cd" else ("", pretrained))
        assert config["lr"] == 1e-4 and config["total_steps"] == 15   # the preset's fine-tune settings
    assert result["skipped"] == [] and len(result["trained"]) == 14 and len(result["evaluated"]) == 12
    again = reproduce("smoke", out=out, progress=False, protocol="cm")
    assert again["trained"] == [] and again["evaluated"] == [] and len(again["skipped"]) == 26
