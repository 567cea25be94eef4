"""Config validation: a typo fails in the first second, naming the key."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dalle_data import config
from dalle_data.settings import resolve

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = yaml.safe_load((ROOT / "configs" / "config.yaml").read_text())


def defaults() -> dict:
    return copy.deepcopy(DEFAULTS)


def test_default_config_is_valid_and_gets_schema_defaults():
    cfg = defaults()
    del cfg["datasets"]["cc12m"]["fraction"]
    config.validate(cfg)
    assert cfg["datasets"]["cc12m"]["fraction"] == 1.0
    assert cfg["datasets"]["cc12m"]["allow_file_urls"] is False
    assert cfg["datasets"]["sample"]["allow_file_urls"] is True


@pytest.mark.parametrize("name", ["cc-12m", "cc_12m", "cc12m.v2", "CC12M", ""])
def test_dataset_names_that_would_break_lineage_names_are_refused(name):
    cfg = defaults()
    cfg["datasets"][name] = cfg["datasets"].pop("cc12m")
    with pytest.raises(config.ConfigError, match=r"\[a-z0-9\]\+"):
        config.validate(cfg)


def test_unknown_key_is_named():
    cfg = defaults()
    cfg["datasets"]["wit"]["langauges"] = ["en"]
    with pytest.raises(config.ConfigError, match=r"datasets\.wit.*langauges"):
        config.validate(cfg)


def test_wrong_type_is_named():
    cfg = defaults()
    cfg["image_size"] = "big"
    with pytest.raises(config.ConfigError, match=r"config key image_size: 'big'"):
        config.validate(cfg)


def test_source_may_be_a_string_or_a_list():
    cfg = defaults()
    cfg["datasets"]["cc12m"]["source"] = ["a.tsv", "file:///b.tsv"]
    config.validate(cfg)
    cfg["datasets"]["cc12m"]["source"] = []
    with pytest.raises(config.ConfigError, match="datasets.cc12m.source"):
        config.validate(cfg)


def test_snakemake_refuses_a_bad_dataset_name_before_any_work(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({"datasets": {"my_set": DEFAULTS["datasets"]["cc12m"]}}))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "sample_shards", "--configfile", str(extra)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "dataset name 'my_set' is invalid" in result.stdout + result.stderr


def test_output_dir_placeholder_follows_an_overridden_output_dir():
    cfg = defaults()
    cfg["output_dir"] = "/scratch/build"
    config.validate(cfg)
    assert cfg["datasets"]["sample"]["source"] == "/scratch/build/sample/source/sample.tsv"
    assert resolve(cfg)["sample"].tokenizer == "hug:/scratch/build/sample/tokenizer/tokenizer.json"
    assert cfg["train"]["output_dir"] == "/scratch/build/models"
    assert cfg["datasets"]["cc12m"]["source"].startswith("https://")


@pytest.mark.parametrize("url", ["s3://bucket/run", "gs://bucket/run/"])
def test_a_bucket_output_dir_builds_in_work_dir(url):
    cfg = defaults()
    cfg["output_dir"] = url
    config.validate(cfg)
    assert config.local_output_dir(cfg) == "data"
    assert config.bucket_output_dir(cfg) == url.rstrip("/")


@pytest.mark.parametrize("url", ["hf://datasets/me/shards", "https://example.org/data"])
def test_an_output_dir_without_a_storage_plugin_is_refused(url):
    cfg = defaults()
    cfg["output_dir"] = url
    with pytest.raises(config.ConfigError, match="no Snakemake storage plugin.*dalle-data put"):
        config.validate(cfg)


def test_eval_and_dedup_defaults():
    cfg = config.validate(defaults())
    assert cfg["dedup"] == {"max_distance": 3}
    cc12m, sample = cfg["datasets"]["cc12m"], cfg["datasets"]["sample"]
    assert (cc12m["eval_fraction"], cc12m["eval_max_rows"], cc12m["dedup_against"]) == (
        0.001,
        10000,
        [],
    )
    assert cc12m["near_duplicates"] is True and sample["near_duplicates"] is False
    assert sample["eval_fraction"] > 0 and sample["eval_max_rows"] <= 100


@pytest.mark.parametrize(
    ("against", "message"),
    [
        ({"wit": ["laion"]}, "'laion' is not a configured dataset"),
        ({"wit": ["wit"]}, "'wit' is the dataset itself"),
        ({"wit": ["cc12m"], "cc12m": ["yfcc"], "yfcc": ["wit"]}, "loops"),
    ],
)
def test_dedup_against_names_other_datasets_without_a_loop(against, message):
    cfg = defaults()
    for name, others in against.items():
        cfg["datasets"][name]["dedup_against"] = others
    with pytest.raises(config.ConfigError, match=message):
        config.validate(cfg)


def test_snakemake_builds_a_dedup_against_dataset_first(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text(
        yaml.safe_dump(
            {"output_dir": str(tmp_path / "out"), "datasets": {"wit": {"dedup_against": ["cc12m"]}}}
        )
    )
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", str(out / "wit/shards/manifest.json")]
        + ["--configfile", str(extra)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    plan = result.stdout + result.stderr
    # wit's finalize waits for both index.parquet files of cc12m, which cc12m's finalize makes.
    wit_finalize = plan[plan.index(f"output: {out}/wit/shards/manifest.json") - 400 :]
    assert f"{out}/cc12m/eval/index.parquet" in wit_finalize.split("output:")[0]
    assert f"output: {out}/cc12m/shards/manifest.json" in plan


def test_config_values_from_the_command_line_are_coerced_by_the_schema():
    """`--config` parses nested values as strings (YAML BaseLoader): the README's form works."""
    from snakemake.cli import parse_config
    from snakemake.utils import update_config

    cfg = defaults()
    given = parse_config(
        [
            "datasets={cc12m: {format: cc12m, source: x.tsv, fraction: 0.01, max_rows: null}, "
            "laion: {format: table, source: [a.parquet], url_column: URL, caption_column: TEXT, "
            "min_values: {similarity: 0.3}, header: false}, wit: {format: wit, source: w.tsv, "
            "wit_files: [1, 2], allow_file_urls: true}}",
            "shard_size=10",
        ]
    )
    assert given["datasets"]["cc12m"]["fraction"] == "0.01"
    update_config(cfg, given)
    config.validate(cfg)
    assert cfg["datasets"]["cc12m"]["fraction"] == 0.01
    assert cfg["datasets"]["cc12m"]["max_rows"] is None
    assert cfg["datasets"]["laion"]["min_values"] == {"similarity": 0.3}
    assert cfg["datasets"]["laion"]["header"] is False
    assert cfg["datasets"]["wit"]["wit_files"] == [1, 2]
    assert cfg["datasets"]["wit"]["allow_file_urls"] is True
    assert cfg["datasets"]["laion"]["url_column"] == "URL"


def test_a_string_that_is_not_the_wanted_type_is_still_refused():
    cfg = defaults()
    cfg["datasets"]["cc12m"]["fraction"] = "a lot"
    with pytest.raises(config.ConfigError, match="datasets.cc12m.fraction: 'a lot'"):
        config.validate(cfg)


def test_format_keys_belong_to_their_format_and_folders_read_file_urls():
    cfg = defaults()
    cfg["datasets"]["cc12m"]["url_column"] = "URL"
    with pytest.raises(config.ConfigError, match="url_column apply only to format: table"):
        config.validate(cfg)
    cfg = defaults()
    cfg["datasets"]["photos"] = {"format": "folder", "source": "my-photos"}
    config.validate(cfg)
    assert cfg["datasets"]["photos"]["allow_file_urls"] is True
    cfg["datasets"]["photos"]["allow_file_urls"] = False
    with pytest.raises(config.ConfigError, match="photos.allow_file_urls"):
        config.validate(cfg)
