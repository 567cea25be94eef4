# Config validation and the input functions every rule file uses.

from dalle_data import config as ddconfig

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


def dataset_image_size(dataset):
    """Shorter side of stored images: the dataset's own `image_size`, else the global one."""
    return ds_config(dataset).get("image_size") or config["image_size"]


def tokenizer_input(dataset):
    """The tokenizer file a shard rule must wait for (none for the built-in `simple`)."""
    spec = ddconfig.dataset_tokenizer(config, dataset)
    return [spec.split(":", 1)[1]] if ":" in spec else []
