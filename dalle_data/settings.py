"""Each dataset's effective settings, resolved once from the validated config.

The rule files only wire inputs, outputs and ``dalle-data`` calls: every decision about a
dataset (its image size and tokenizer, whether the pipeline trains that tokenizer or
generates the source, which options each stage gets) is made here, in plain Python that
tests can call. Defaults come from the schema (filled in by :func:`config.validate`), never
from here.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from typing import Any

from dalle_data.config import TABLE_COLUMNS, ConfigError, local_output_dir, tokenizer_file

_REMOTE = re.compile(r"^(?i:https?|file)://")
# The `dalle-data download` options a config's `download:` section sets, one to one.
DOWNLOAD_OPTIONS = (
    "thread_count",
    "timeout",
    "retries",
    "min_image_size",
    "max_aspect_ratio",
    "distributor",
    "user_agent_token",
    "contact",
    "max_requests_per_second_per_host",
    "retry_rounds",
    "retry_after_max",
    "retry_backoff",
)
# Format options (table, folder) that `dalle-data normalize` takes as `--<key> VALUE`.
NORMALIZE_OPTIONS = (*TABLE_COLUMNS, "file_type", "caption_lines")
# The bundled offline source: a local `sample.tsv` that `dalle-data make-sample` writes.
SAMPLE_SOURCE = "sample.tsv"


@dataclass(frozen=True)
class DatasetSettings:
    """What the pipeline does for one dataset, every value final."""

    name: str
    dir: str
    config: dict[str, Any]
    download: dict[str, Any]
    filters: dict[str, Any]
    dedup: dict[str, Any]
    image_size: int
    tokenizer: str
    shard_size: int
    trained_tokenizer: str | None
    generated_source: str | None

    @property
    def sources(self) -> list[str]:
        source = self.config["source"]
        return [source] if isinstance(source, str) else list(source)

    @property
    def local_inputs(self) -> list[str]:
        """Local source files, so the rule that makes them runs first and edits refetch."""
        subset = self.config.get("subset")
        return [s for s in self.sources + ([subset] if subset else []) if not _REMOTE.match(s)]

    @property
    def tokenizer_file(self) -> list[str]:
        """The tokenizer file shard rules wait for (none for the built-in ``simple``)."""
        path = tokenizer_file(self.tokenizer)
        return [path] if path else []

    def fetch_args(self) -> str:
        args = [a for s in self.sources for a in ("--source", s)]
        if self.config.get("subset"):
            args += ["--subset", self.config["subset"]]
        args += [a for i in self.config.get("wit_files") or [] for a in ("--select", str(i))]
        return shlex.join(args)

    def normalize_args(self) -> str:
        args = ["--format", self.config["format"]]
        args += [a for lang in self.config.get("languages") or [] for a in ("--language", lang)]
        args += [a for lic in self.config.get("licenses") or [] for a in ("--license", lic)]
        cfg = self.config
        args += [a for k in NORMALIZE_OPTIONS if k in cfg for a in (_flag(k), str(cfg[k]))]
        args += [a for c in cfg.get("keep_columns") or [] for a in ("--keep-column", str(c))]
        values = sorted({**cfg.get("min_values", {}), **cfg.get("max_values", {})})
        args += [a for c in values for a in ("--value-column", c)]
        args += [a for c in cfg.get("column_names") or [] for a in ("--column-name", c)]
        args += [] if cfg.get("header", True) else ["--no-header"]
        return shlex.join(args)

    def filter_args(self) -> str:
        args = ["--fraction", str(self.config["fraction"])]
        if self.config.get("max_rows"):
            args += ["--max-rows", str(self.config["max_rows"])]
        args.append(self._file_urls())
        args += ["--min-words", str(self.filters["min_words"])]
        args += ["--max-words", str(self.filters["max_words"])]
        args += [a for w in self.filters["blocklist"] for a in ("--blocklist", w)]
        for key in ("min_values", "max_values"):
            bounds = sorted(self.config.get(key, {}).items())
            args += [a for c, v in bounds for a in (_flag(key[:3] + "_value"), f"{c}={v}")]
        return shlex.join(args)

    def plan_args(self) -> str:
        rows = str(self.download["rows_per_part"])
        return shlex.join(["--rows-per-part", rows, self._file_urls()])

    def download_args(self) -> str:
        """Every `dalle-data download` option but the part, its folder and --processes."""
        d = self.download
        args = ["--image-size", str(self.image_size)]
        for key in DOWNLOAD_OPTIONS:
            if d[key] is not None:  # null: the option's own "none" (no contact, no limit)
                args += [_flag(key), str(d[key])]
        if d.get("spark_master"):
            args += ["--spark-master", d["spark_master"]]
        for key, value in sorted(d.get("spark_conf", {}).items()):
            args += ["--spark-conf", f"{key}={value}"]
        return shlex.join(args)

    def finalize_args(self) -> str:
        args = ["--dataset", self.name, "--tokenizer", self.tokenizer]
        args += ["--image-size", str(self.image_size), "--shard-size", str(self.shard_size)]
        args += ["--eval-fraction", str(self.config["eval_fraction"])]
        args += ["--eval-max-rows", str(self.config["eval_max_rows"] or 0)]
        args += ["--max-distance", str(self.dedup["max_distance"])]
        args.append(
            "--near-duplicates" if self.config["near_duplicates"] else "--no-near-duplicates"
        )
        for other in self.config["dedup_against"]:
            args += ["--dedup-against", f"{other}={self._sibling(other)}"]
        return shlex.join(args)

    @property
    def dedup_against_indexes(self) -> list[str]:
        """index.parquet of both shard sets of each ``dedup_against`` dataset: finalize's
        inputs, so those datasets are built first."""
        return [
            f"{self._sibling(other)}/{folder}/index.parquet"
            for other in self.config["dedup_against"]
            for folder in ("shards", "eval")
        ]

    def _sibling(self, dataset: str) -> str:
        """The folder of another dataset of the same output_dir."""
        return f"{os.path.dirname(self.dir)}/{dataset}"

    def _file_urls(self) -> str:
        return "--allow-file-urls" if self.config["allow_file_urls"] else "--no-allow-file-urls"


def _flag(key: str) -> str:
    """The command-line option for a config key: ``url_column`` -> ``--url-column``."""
    return "--" + key.replace("_", "-")


def resolve(config: dict[str, Any]) -> dict[str, DatasetSettings]:
    """The settings of every configured dataset, from a config :func:`config.validate` filled."""
    out = local_output_dir(config)
    resolved = {}
    for name, ds in config["datasets"].items():
        tokenizer = ds.get("tokenizer") or config["tokenizer"]
        resolved[name] = DatasetSettings(
            name=name,
            dir=f"{out}/{name}",
            config=ds,
            download=config["download"],
            filters=config["filters"],
            dedup=config["dedup"],
            image_size=ds.get("image_size") or config["image_size"],
            tokenizer=tokenizer,
            shard_size=config["shard_size"],
            trained_tokenizer=_trained_tokenizer(name, ds, tokenizer, out),
            generated_source=_generated_source(ds),
        )
    return resolved


def _trained_tokenizer(name: str, ds: dict[str, Any], spec: str, out: str) -> str | None:
    """The tokenizer.json the pipeline trains for this dataset: a ``hug:`` file below
    output_dir; None for ``simple``, ``yttm:`` or a file the user provides elsewhere."""
    path = tokenizer_file(spec)
    if not spec.startswith("hug:") or path is None:
        return None
    path = os.path.normpath(path)
    if not os.path.abspath(path).startswith(os.path.abspath(out) + os.sep):
        return None
    if "tokenizer_vocab_size" not in ds:
        raise ConfigError(
            f"dataset {name!r}: the pipeline trains its tokenizer {path} (it lies below "
            f"output_dir), but datasets.{name}.tokenizer_vocab_size is not set: add it"
        )
    return path


def _generated_source(ds: dict[str, Any]) -> str | None:
    """The offline sample's source file, when this dataset reads one the pipeline makes."""
    source = ds["source"]
    local = isinstance(source, str) and not _REMOTE.match(source)
    return source if local and os.path.basename(source) == SAMPLE_SOURCE else None
