"""`online-dpo tune`'s search space: parsing, validation at the edge, and what it writes (no Ray)."""

from pathlib import Path

import pytest

from online_dpo.config import ConfigError
from online_dpo.tune import check_space, parse_grid, parse_ranges, plot, trial_config, write_csv

DEFAULT = str(Path(__file__).parents[2] / "configs" / "default.yaml")


def test_grid_and_range_parsing():
    assert parse_grid(["train.beta=0.05,0.1,0.2"]) == {"train.beta": [0.05, 0.1, 0.2]}
    assert parse_grid(["train.loss=[sigmoid, ipo]"]) == {"train.loss": ["sigmoid", "ipo"]}
    assert parse_ranges(["train.lr=loguniform:1e-5:1e-3"]) == {"train.lr": ("loguniform", 1e-5, 1e-3)}
    for bad in (["train.lr=log:1:2"], ["train.lr=uniform:2:1"], ["train.lr=loguniform:0:1"], ["train.lr=1e-5"]):
        with pytest.raises(ConfigError, match="--range"):
            parse_ranges(bad)
    with pytest.raises(ConfigError, match="--grid 'train.beta'"):
        parse_grid(["train.beta"])


def test_a_trial_is_the_base_config_with_its_values(tmp_path):
    cfg = trial_config(DEFAULT, ["train.max_steps=20"], {"train.beta": 0.2, "train.loss": "ipo"}, tmp_path, "t1")
    assert (cfg.train.beta, cfg.train.loss, cfg.train.max_steps) == (0.2, "ipo", 20)
    assert cfg.run.output_dir == str(tmp_path) and cfg.run.name == "t1"


def test_an_invalid_search_space_is_refused_before_any_trial_and_names_the_field():
    with pytest.raises(ConfigError, match="nothing to search"):
        check_space(DEFAULT, [], {}, {})
    with pytest.raises(ConfigError, match="train.betta"):
        check_space(DEFAULT, [], {"train.betta": [0.1]}, {})
    with pytest.raises(ConfigError, match=r"invalid point .*train.beta"):
        check_space(DEFAULT, [], {"train.beta": [0.1, -1.0]}, {})
    with pytest.raises(ConfigError, match="train.lr"):
        check_space(DEFAULT, [], {}, {"train.lr": ("uniform", -1.0, 1.0)})
    check_space(DEFAULT, [], {"train.beta": [0.05, 0.2]}, {"train.lr": ("loguniform", 1e-5, 1e-3)})


def test_results_table_and_plot(tmp_path):
    rows = [{"train.beta": b, "reward": r, "win_rate": 0.9, "kl": k, "steps": 30, "finished": True, "error": "",
             "run_dir": "x"} for b, r, k in ((0.05, 0.9, 12.0), (0.1, 0.8, 6.0), (0.2, 0.6, 3.0))]
    write_csv(tmp_path / "results.csv", rows, ["train.beta"])
    lines = (tmp_path / "results.csv").read_text().splitlines()
    assert lines[0].startswith("train.beta,reward,win_rate,kl,steps") and len(lines) == 4
    plot(tmp_path / "tune.png", rows, ["train.beta"], "reward")
    assert (tmp_path / "tune.png").stat().st_size > 1000
