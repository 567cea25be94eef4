# Config validation and the functions the rule files use, by stage (snakemake --lint
# wants functions apart from rules).

import functools
import json
import os
import shlex
import shutil
from pathlib import Path

from dalle_data import config as ddconfig
from dalle_data import locations, stage_server
from dalle_data.compat import end_snakemake_run, start_snakemake_run
from dalle_data.settings import resolve
from dalle_data.model.output_name import planned_output

ddconfig.validate(config)
if (
    config["stage_server"]
    and workflow.is_main_process
    and not getattr(workflow.output_settings, "dryrun", False)
):
    # This run's stage server (dalle_data/stage_server.py): the shard stages fork from one
    # process that imported their libraries. Started here rather than at onstart, so its
    # imports overlap the rest of Snakemake's start-up (reading the rule files, building the
    # DAG: about 0.2 s) on another core; a dry run starts none.
    stage_server.start()
# Every dataset's effective settings, decided once (dalle_data/settings.py).
DS = resolve(config)

# Where the stages write: output_dir, or work_dir when output_dir is a bucket URL. Then
# each dataset's finished shards/ go to BUCKET through Snakemake's storage plugin of the
# URL's scheme (s3 or gcs; see the bucket_shards rule) and training streams them from there.
OUT = ddconfig.local_output_dir(config)
BUCKET = ddconfig.bucket_output_dir(config)
if BUCKET and workflow.is_main_process and not any(Path(".snakemake/locks").glob("*")):
    # Snakemake keeps its local copy of a folder it sends to storage. Left over from a run
    # killed mid-upload, that copy makes the rerun fail (Snakemake 9.27 caches it as present,
    # removes it as an incomplete output, then finds it "write-protected"). It only holds
    # hard links to work_dir's shards and eval split: drop it before the DAG is built (never
    # while another Snakemake holds this folder's lock). storage() names it for any plugin.
    _copy = Path(storage(BUCKET))
    for _stale in [*_copy.glob("*/shards"), *_copy.glob("*/eval")]:
        shutil.rmtree(_stale)
if config["storage_options"]:
    # Non-secret fsspec options for every `dalle-data` command (dalle_data/locations.py).
    os.environ[locations.OPTIONS_ENV] = json.dumps(config["storage_options"])


wildcard_constraints:
    dataset="[a-z0-9]+",


def start_run():
    """The run starts: Snakemake's own lazy pandas import, done while the first job runs."""
    start_snakemake_run()


def end_run():
    """The run is over: the stage server stops, and so does Snakemake's exit timer."""
    stage_server.stop()
    end_snakemake_run()


def ds_dir(dataset):
    """`<output_dir>/<dataset>`: everything built for one dataset."""
    return f"{OUT}/{dataset}"


def settings(dataset):
    """The resolved settings of a configured dataset (a clear error for any other name)."""
    if dataset not in DS:
        raise ValueError(
            f"dataset {dataset!r} is not configured: add it under `datasets:` in "
            "configs/config.yaml or a --configfile"
        )
    return DS[dataset]


def verified(dataset):
    """The record `dalle-data verify` writes once a dataset's shards check out."""
    settings(dataset)
    return f"{ds_dir(dataset)}/shards/verify.json"


def built(dataset):
    """A dataset target's end points: verified shards and their card (in the bucket, for a
    bucket output_dir)."""
    if BUCKET:
        return [storage(bucket_shards(dataset)), storage(f"{BUCKET}/{dataset}/eval")]
    return [
        verified(dataset),
        f"{ds_dir(dataset)}/eval/verify.json",
        f"{ds_dir(dataset)}/shards/README.md",
    ]


def card_of(wildcards):
    """The card a shard set's upload waits for: the training shards' (it covers the eval
    split too); none for the eval split itself."""
    if wildcards.shardset != "shards":
        return []
    return f"{ds_dir(wildcards.dataset)}/shards/README.md"


def bucket_shards(dataset):
    """`<output_dir>/<dataset>/shards` when output_dir is a bucket URL."""
    return f"{BUCKET}/{dataset}/shards"


def training_shards(dataset):
    """train-extend's inputs: the verified local shards and eval split (train-extend scores
    parent and child on it), or their bucket folders, which Snakemake does not download
    (retrieve=False): train-extend streams them through its cache."""
    if BUCKET:
        folders = (bucket_shards(dataset), f"{BUCKET}/{dataset}/eval")
        return [storage(folder, retrieve=False) for folder in folders]
    return [verified(dataset), f"{ds_dir(dataset)}/eval/verify.json"]


def training_shards_location(wildcards, input):
    """What train-extend's --shards gets: the folder of the verified local shards (the
    first input), or the bucket URL that train-extend streams from."""
    return bucket_shards(TRAIN["dataset"]) if BUCKET else os.path.dirname(input.shards[0])


def tokenizer_input(dataset):
    """The tokenizer file a shard rule must wait for (none for the built-in `simple`)."""
    return settings(dataset).tokenizer_file


def stage_args(stage):
    """A rule's `params:` function: the dataset's options for `dalle-data <stage>`."""
    return lambda wc: getattr(settings(wc.dataset), f"{stage}_args")()


# Shards (pipelines/shards.smk).


def downloaded_parts(wildcards):
    """The record of every part the download plan of this dataset calls for."""
    plan = checkpoints.plan_download.get(dataset=wildcards.dataset).output.plan
    with open(plan) as fh:
        parts = json.load(fh)["parts"]
    return [f"{OUT}/{wildcards.dataset}/downloaded/{p['name']}.json" for p in parts]


def dedup_against_indexes(wildcards):
    """index.parquet of both shard sets of every dataset this one dedups against, so
    Snakemake builds those datasets first."""
    return settings(wildcards.dataset).dedup_against_indexes


# Training (pipelines/train.smk).

TRAIN = config.get("train", {})


def all_cores(wildcards):
    """A training rule's threads: every core --cores gives. A function, so it is asked only
    for a job to run: `snakemake --unlock` and other commands without --cores still work."""
    return workflow.cores


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


COLLECTION = f"{OUT}/collection"


def collection_outputs():
    """What `dalle-data publish` rewrites at the collection's root (the published folder
    itself is not an output: Snakemake would create it first, and publish refuses a folder
    that is already there with other contents)."""
    return {
        "index": f"{COLLECTION}/index.json",
        "front_page": f"{COLLECTION}/README.md",
        "lineage": f"{COLLECTION}/lineage.png",
    }


def demo_outputs():
    """The offline demo's target (`all`): the trained checkpoint, its card and samples, the
    card of the dataset it trained on, and the collection it is published into."""
    return [
        *trained_outputs().values(),
        *built(TRAIN["dataset"]),
        *collection_outputs().values(),
    ]


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
        "cache-dir": TRAIN.get("cache_dir"),
        "cache-size": TRAIN.get("cache_size"),
    }
    words = [f"--{k} {shlex.quote(str(v))}" for k, v in flags.items() if v is not None]
    words += [f"--prompt {shlex.quote(p)}" for p in TRAIN.get("prompts", [])]
    if TRAIN.get("evaluate_colours"):
        words.append("--evaluate-colours")
    return " ".join(words)
