# Config validation and the functions the rule files use, by stage (snakemake --lint
# wants functions apart from rules).

import functools
import json
import re
import shlex
from pathlib import Path

from dalle_data import config as ddconfig
from dalle_data.model.output_name import planned_output

ddconfig.validate(config)

OUT = config["output_dir"]


wildcard_constraints:
    dataset="[a-z0-9]+",


def ds_dir(dataset):
    """`<output_dir>/<dataset>`: everything built for one dataset."""
    return f"{OUT}/{dataset}"


def ds_config(dataset):
    if dataset not in config["datasets"]:
        raise ValueError(
            f"dataset {dataset!r} is not configured: add it under `datasets:` in "
            "configs/config.yaml or a --configfile"
        )
    return config["datasets"][dataset]


def verified(dataset):
    """The record `dalle-data verify` writes once a dataset's shards check out."""
    ds_config(dataset)
    return f"{ds_dir(dataset)}/shards/verify.json"


def built(dataset):
    """A dataset target's end points: verified shards and eval split, and their card."""
    return [
        verified(dataset),
        f"{ds_dir(dataset)}/eval/verify.json",
        f"{ds_dir(dataset)}/shards/README.md",
    ]


def dataset_image_size(dataset):
    """Shorter side of stored images: the dataset's own `image_size`, else the global one."""
    return ds_config(dataset).get("image_size") or config["image_size"]


def tokenizer_input(dataset):
    """The tokenizer file a shard rule must wait for (none for the built-in `simple`)."""
    spec = ddconfig.dataset_tokenizer(config, dataset)
    return [spec.split(":", 1)[1]] if ":" in spec else []


# Metadata (pipelines/metadata.smk): sources and the fetch/normalize/filter options.


def _sources(dataset):
    source = ds_config(dataset)["source"]
    return [source] if isinstance(source, str) else list(source)


def is_local(source):
    return re.match(r"^(?i:https?|file)://", source) is None


def local_sources(dataset):
    """Local source files, so their rule (sample_source) runs first and edits refetch."""
    subset = ds_config(dataset).get("subset")
    return [s for s in _sources(dataset) + ([subset] if subset else []) if is_local(s)]


def fetch_args(dataset):
    cfg = ds_config(dataset)
    args = [a for s in _sources(dataset) for a in ("--source", s)]
    if cfg.get("subset"):
        args += ["--subset", cfg["subset"]]
    args += [a for i in cfg.get("wit_files") or [] for a in ("--select", str(i))]
    return shlex.join(args)


def normalize_args(dataset):
    cfg = ds_config(dataset)
    args = ["--format", cfg["format"]]
    args += [a for lang in cfg.get("languages") or [] for a in ("--language", lang)]
    args += [a for lic in cfg.get("licenses") or [] for a in ("--license", lic)]
    return shlex.join(args)


def filter_args(dataset):
    cfg = ds_config(dataset)
    filters = config.get("filters", {})
    args = ["--fraction", str(cfg.get("fraction", 1.0))]
    if cfg.get("max_rows"):
        args += ["--max-rows", str(cfg["max_rows"])]
    args.append("--allow-file-urls" if cfg.get("allow_file_urls") else "--no-allow-file-urls")
    args += ["--min-words", str(filters.get("min_words", 1))]
    args += ["--max-words", str(filters.get("max_words", 200))]
    args += [a for w in filters.get("blocklist") or [] for a in ("--blocklist", w)]
    return shlex.join(args)


# Download (pipelines/download.smk).


def spark_options(download):
    """`--spark-master`/`--spark-conf` arguments for the pyspark distributor (quoted)."""
    args = []
    if download.get("spark_master"):
        args.append(f"--spark-master {shlex.quote(download['spark_master'])}")
    for key, value in sorted(download.get("spark_conf", {}).items()):
        args.append(f"--spark-conf {shlex.quote(f'{key}={value}')}")
    return " ".join(args)


# Shards (pipelines/shards.smk).


def downloaded_parts(wildcards):
    """Every part folder the download plan of this dataset calls for."""
    plan = checkpoints.plan_download.get(dataset=wildcards.dataset).output.plan
    with open(plan) as fh:
        parts = json.load(fh)["parts"]
    return [f"{OUT}/{wildcards.dataset}/downloaded/{p['name']}" for p in parts]


def dedup_against_indexes(wildcards):
    """index.parquet of both shard sets of every dataset this one dedups against, so
    Snakemake builds those datasets first."""
    return [
        f"{ds_dir(other)}/{folder}/index.parquet"
        for other in ds_config(wildcards.dataset)["dedup_against"]
        for folder in ("shards", "eval")
    ]


def finalize_args(dataset):
    """The held-out split and dedup options of finalize."""
    cfg = ds_config(dataset)
    args = ["--eval-fraction", str(cfg["eval_fraction"])]
    if cfg["eval_max_rows"] is not None:
        args += ["--eval-max-rows", str(cfg["eval_max_rows"])]
    args += ["--max-distance", str(config["dedup"]["max_distance"])]
    args.append("--near-duplicates" if cfg["near_duplicates"] else "--no-near-duplicates")
    args += [a for o in cfg["dedup_against"] for a in ("--dedup-against", f"{o}={ds_dir(o)}")]
    return shlex.join(args)


# Training (pipelines/train.smk).

TRAIN = config.get("train", {})


@functools.cache
def trained_checkpoint():
    """`<train.output_dir>/<family>/<name>/<name>.pt` for the configured run (computed once:
    a parent checkpoint that exists is loaded to name it)."""
    return str(
        planned_output(
            Path(TRAIN["parent"]),
            TRAIN["dataset"],
            TRAIN["epochs"],
            Path(TRAIN["output_dir"]),
            parent_lineage=TRAIN.get("parent_lineage"),
            max_steps=TRAIN.get("max_steps"),
        )
    )


def trained_outputs():
    """The checkpoint and the files train-extend writes beside it."""
    folder = Path(trained_checkpoint()).parent
    outputs = {
        "checkpoint": trained_checkpoint(),
        "lineage": str(folder / "lineage.json"),
        "card": str(folder / "README.md"),
        "samples": str(folder / "samples.png"),
    }
    if TRAIN.get("evaluate_colours"):
        outputs["quality"] = str(folder / "quality.json")
        outputs["colours"] = str(folder / "colours.png")
    return outputs


def demo_outputs():
    """The offline demo's target (`all`): the trained checkpoint, its card and samples, and
    the card of the dataset it trained on."""
    return [*trained_outputs().values(), *built(TRAIN["dataset"])]


def train_options():
    """train-extend options from the config; unset optional keys are left out."""
    flags = {
        "batch-size": TRAIN.get("batch_size"),
        "learning-rate": TRAIN.get("learning_rate"),
        "clip-grad-norm": TRAIN.get("clip_grad_norm"),
        "seed": TRAIN.get("seed"),
        "num-workers": TRAIN.get("num_workers"),
        "save-every-n-steps": TRAIN.get("save_every_n_steps"),
        "vqgan-model-path": TRAIN.get("vqgan_model_path"),
        "vqgan-config-path": TRAIN.get("vqgan_config_path"),
        "parent-lineage": TRAIN.get("parent_lineage"),
    }
    words = [f"--{k} {shlex.quote(str(v))}" for k, v in flags.items() if v is not None]
    words += [f"--prompt {shlex.quote(p)}" for p in TRAIN.get("prompts", [])]
    if TRAIN.get("evaluate_colours"):
        words.append("--evaluate-colours")
    return " ".join(words)
