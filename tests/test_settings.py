"""Settings resolved once from the validated config: what each stage of a dataset gets."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from dalle_data import config
from dalle_data.settings import resolve

ROOT = Path(__file__).resolve().parents[1]


def _config(**datasets: dict) -> dict:
    cfg = yaml.safe_load((ROOT / "configs/config.yaml").read_text())
    cfg["datasets"].update(datasets)
    return config.validate(cfg)


def test_defaults_come_from_the_schema_when_a_config_leaves_them_out() -> None:
    cfg = config.validate({"datasets": {"mine": {"format": "cc12m", "source": "a.tsv"}}})
    mine = resolve(cfg)["mine"]
    assert mine.image_size == config.schema_default("image_size") == 256
    assert mine.tokenizer == "simple" and mine.tokenizer_file == []
    args = shlex.split(mine.filter_args())
    assert args[args.index("--min-words") + 1] == str(config.schema_default("filters", "min_words"))
    assert "--no-allow-file-urls" in args
    download = shlex.split(mine.download_args())
    assert download[download.index("--thread-count") + 1] == "32"


def test_a_dataset_overrides_image_size_and_tokenizer() -> None:
    sample = resolve(_config())["sample"]
    assert sample.image_size == 64
    assert sample.tokenizer_file == ["data/sample/tokenizer/tokenizer.json"]
    assert sample.trained_tokenizer == "data/sample/tokenizer/tokenizer.json"
    assert sample.generated_source == "data/sample/source/sample.tsv"
    assert shlex.split(sample.finalize_args()) == [
        "--dataset", "sample", "--tokenizer", "hug:data/sample/tokenizer/tokenizer.json",
        "--image-size", "64", "--shard-size", "1000",
        "--eval-fraction", "0.05", "--eval-max-rows", "100", "--max-distance", "3",
        "--no-near-duplicates",
    ]  # fmt: skip


def test_dedup_against_names_the_other_datasets_folders() -> None:
    wit = resolve(_config(wit={"format": "wit", "source": "w.tsv", "dedup_against": ["cc12m"]}))
    args = shlex.split(wit["wit"].finalize_args())
    assert args[args.index("--dedup-against") + 1] == "cc12m=data/cc12m"
    assert "--near-duplicates" in args
    uncapped = {"format": "wit", "source": "w.tsv", "eval_max_rows": None}
    args = shlex.split(resolve(_config(wit=uncapped))["wit"].finalize_args())
    assert args[args.index("--eval-max-rows") + 1] == "0"
    assert wit["wit"].dedup_against_indexes == [
        "data/cc12m/shards/index.parquet",
        "data/cc12m/eval/index.parquet",
    ]


def test_a_user_tokenizer_outside_output_dir_is_not_trained() -> None:
    mine = {"format": "cc12m", "source": "x.tsv", "tokenizer": "hug:/opt/tok.json"}
    resolved = resolve(_config(mine=mine))["mine"]
    assert resolved.trained_tokenizer is None and resolved.tokenizer_file == ["/opt/tok.json"]
    assert resolved.generated_source is None


def test_a_trained_tokenizer_needs_its_vocabulary_size() -> None:
    mine = {"format": "cc12m", "source": "x.tsv", "tokenizer": "hug:{output_dir}/mine/t.json"}
    with pytest.raises(config.ConfigError, match="datasets.mine.tokenizer_vocab_size"):
        resolve(_config(mine=mine))


def test_stage_arguments_quote_what_the_shell_would_split() -> None:
    mine = {"format": "cc12m", "source": ["a b.tsv", "https://h/c.tsv"], "subset": "s t.tsv"}
    resolved = resolve(_config(mine=mine))["mine"]
    assert shlex.split(resolved.fetch_args()) == [
        "--source", "a b.tsv", "--source", "https://h/c.tsv", "--subset", "s t.tsv"
    ]  # fmt: skip
    assert resolved.local_inputs == ["a b.tsv", "s t.tsv"]


def test_table_and_folder_options_reach_normalize_and_filter() -> None:
    laion = {
        "format": "table",
        "source": "part.parquet",
        "url_column": "URL",
        "caption_column": "TEXT",
        "keep_columns": ["similarity", "NSFW"],
        "min_values": {"similarity": 0.3},
        "max_values": {"punsafe": 0.5},
    }
    sheet = {"format": "table", "source": "a.csv", "header": False, "url_column": 0}
    photos = {"format": "folder", "source": "my-photos", "caption_lines": "each"}
    ds = resolve(_config(laion=laion, sheet=sheet, photos=photos))
    assert shlex.split(ds["laion"].normalize_args()) == [
        "--format", "table", "--url-column", "URL", "--caption-column", "TEXT",
        "--keep-column", "similarity", "--keep-column", "NSFW",
        "--value-column", "punsafe", "--value-column", "similarity",
    ]  # fmt: skip
    filters = shlex.split(ds["laion"].filter_args())
    assert filters[-4:] == ["--min-value", "similarity=0.3", "--max-value", "punsafe=0.5"]
    assert shlex.split(ds["sheet"].normalize_args())[2:] == ["--url-column", "0", "--no-header"]
    assert "--caption-lines" in ds["photos"].normalize_args()
    assert "--allow-file-urls" in shlex.split(ds["photos"].filter_args())
