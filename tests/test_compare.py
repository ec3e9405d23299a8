"""adv-dpm compare: evaluations paired by seed, cell by cell, with clear errors for sets that cannot pair."""
import pytest

from adv_dpm import compare as cmp
from adv_dpm.cli import main
from adv_dpm.evaluate import write_results


def _evaluation(folder, seed, swd, extra=None):
    """A results.json as adv-dpm evaluate writes it to ``folder``/eval: one consistency cell per NFE of ``swd``."""
    rows = [{"mode": "standard", "step": 10, "data": "toy:rings", "sampler": "consistency", "nfe": nfe,
             "num_samples": 100, "seed": seed, "swd": value, "precision": 0.5, **(extra or {}), "seconds": 1.0,
             "checkpoint": "ckpt.pt"} for nfe, value in swd.items()]
    write_results(folder / "eval", rows, {"checkpoint": "ckpt.pt", "num_samples": 100, "seed": seed, "es_lambda": 1.0},
                  plots=False)


def test_runs_are_paired_by_seed_cell_by_cell(tmp_path, capsys):
    base, run = [1.0, 2.0, 4.0], [1.19, 2.21, 4.2]   # differences 0.19, 0.21, 0.2: mean 0.2, base mean 7/3
    for seed, (b, r) in enumerate(zip(base, run)):
        _evaluation(tmp_path / "base" / f"seed{seed}", seed, {1: b, 2: 10 * b})
        _evaluation(tmp_path / "run" / f"seed{seed}", seed, {1: r, 2: 10 * b})
    _evaluation(tmp_path / "run" / "seed7", 7, {1: 100.0, 2: 100.0})   # a seed the baseline lacks: left out
    _evaluation(tmp_path / "base" / "seed9", 9, {1: 1 / 3, 2: 10 / 3})   # the run lacks: in the baseline's mean only
    rows = cmp.compare(str(tmp_path / "base"), [str(tmp_path / "run")])
    assert [(r["metric"], r["nfe"], r["n"]) for r in rows] == [("swd", 1, 3), ("swd", 2, 3)]
    one, two = rows
    assert one["diff"] == pytest.approx(0.2) and one["rel"] == pytest.approx(0.2 / (7 / 3))
    assert one["diff_lo"] > 0 and one["verdict"] == "worse beyond the seed spread" and 0 < one["p"] < 0.05
    assert two["diff"] == 0 and two["verdict"] == "no difference beyond the seed spread"
    main(["compare", str(tmp_path / "base"), str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    text = (tmp_path / "out" / "compare.md").read_text()
    assert "| consistency | 1 | 1.833 | **+8.6% (" in text and "| consistency | 2 | 18.33 | +0.0% (" in text
    assert text in capsys.readouterr().out and (tmp_path / "out" / "compare.csv").read_text().count("\n") == 3
    assert (tmp_path / "out" / "compare_swd.png").stat().st_size > 0


def test_glob_patterns_labels_and_the_perturbed_scores(tmp_path, monkeypatch):
    for seed in range(2):
        for method, shift in (("ct", 0.0), ("ct_at", 0.5)):
            _evaluation(tmp_path / "proto" / f"seed{seed}" / method, seed,
                        {1: 1.0 + seed + shift}, {"swd_adversarial": 2.0 + seed, "swd_random": 3.0})
    rows = cmp.compare(str(tmp_path / "proto" / "seed*" / "ct"), [str(tmp_path / "proto" / "seed*" / "ct_at")])
    assert [r["metric"] for r in rows] == ["swd", "swd_random", "swd_adversarial"]
    assert rows[0]["n"] == 2 and rows[0]["diff"] == pytest.approx(0.5) and rows[2]["diff"] == 0
    only = cmp.compare(str(tmp_path / "proto" / "seed*" / "ct"), [str(tmp_path / "proto" / "seed*" / "ct_at")],
                       metrics=["precision"])
    assert [r["metric"] for r in only] == ["precision"]
    named = cmp.compare(f"CT={tmp_path / 'proto' / 'seed*' / 'ct'}", [f"AT={tmp_path / 'proto' / 'seed*' / 'ct_at'}"])
    assert {(r["baseline"], r["run"]) for r in named} == {("CT", "AT")}
    assert [r["diff"] for r in named] == [r["diff"] for r in rows]
    assert "Each run − the baseline CT " in cmp.report(named) and "| AT (n=2) |" in cmp.report(named)
    monkeypatch.chdir(tmp_path)
    _evaluation(tmp_path / "lr=0.1" / "seed0", 0, {1: 1.0})   # an existing path with '=' in its name stays a path
    assert cmp.labelled("lr=0.1") == ("lr=0.1", "lr=0.1") and cmp.labelled("lr=0.2") == ("lr", "0.2")
    assert cmp.labelled("runs/lr=0.2") == ("runs/lr=0.2", "runs/lr=0.2")   # a label has no '/'
    for seed in range(2):   # evaluated without --robustness: its perturbed scores are left out, not an error
        _evaluation(tmp_path / "clean" / f"seed{seed}", seed, {1: 1.0})
    assert [r["metric"] for r in cmp.compare(str(tmp_path / "proto" / "seed*" / "ct"), [str(tmp_path / "clean")])] \
        == ["swd"]
    with pytest.raises(ValueError, match=r"metrics \['fd'\] are not in the baseline's evaluations, which have"):
        cmp.compare(str(tmp_path / "proto" / "seed*" / "ct"), [str(tmp_path / "proto" / "seed*" / "ct_at")],
                    metrics=["fd"])


def test_sets_that_cannot_pair_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="no results.json"):
        cmp.compare(str(tmp_path / "nothing"), [str(tmp_path / "nothing")])
    _evaluation(tmp_path / "a" / "one", 0, {1: 1.0})
    _evaluation(tmp_path / "a" / "two", 0, {1: 1.0})
    with pytest.raises(ValueError, match="both evaluate seed 0"):
        cmp.compare(str(tmp_path / "a"), [str(tmp_path / "a")])
    _evaluation(tmp_path / "b", 1, {1: 1.0})
    _evaluation(tmp_path / "c", 2, {1: 1.0})
    with pytest.raises(ValueError, match="no seed in common"):
        cmp.compare(str(tmp_path / "b"), [str(tmp_path / "c")])
    _evaluation(tmp_path / "d", 1, {4: 1.0})
    with pytest.raises(ValueError, match="no sampler, NFE and metric evaluated in both"):
        cmp.compare(str(tmp_path / "b"), [str(tmp_path / "d")])
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "results.json").write_text("[]")   # JSON, but not an evaluation
    with pytest.raises(ValueError, match="not a results.json of adv-dpm evaluate"):
        cmp.compare(str(tmp_path / "e"), [str(tmp_path / "b")])
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "results.json").write_text('{"rows": [')   # cut off
    with pytest.raises(ValueError, match=r"f/results.json is not valid JSON \(Expecting"):
        cmp.compare(str(tmp_path / "f"), [str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="adv-dpm compare: error: .*no seed in common"):
        main(["compare", str(tmp_path / "b"), str(tmp_path / "c")])
