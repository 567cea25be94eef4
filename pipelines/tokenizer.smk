# Tokenizer: a dataset whose `tokenizer` is `hug:<path>` with <path> below output_dir gets
# a small byte-level BPE trained on its filtered captions (`tokenizer_vocab_size` tokens).
# Shard rules wait for it through tokenizer_input() in common.smk.

import os


def trained_tokenizer(dataset):
    """The tokenizer.json this pipeline trains for `dataset`, or None (simple, yttm, or a
    hug file the user provides outside output_dir)."""
    spec = ddconfig.dataset_tokenizer(config, dataset)
    if not spec.startswith("hug:"):
        return None
    path = os.path.normpath(spec.split(":", 1)[1])
    if not os.path.abspath(path).startswith(os.path.abspath(OUT) + os.sep):
        return None
    if "tokenizer_vocab_size" not in ds_config(dataset):
        raise ValueError(
            f"dataset {dataset!r}: the pipeline trains its tokenizer {path}, but "
            f"datasets.{dataset}.tokenizer_vocab_size is not set: add it to the config"
        )
    return path


for _dataset in config["datasets"]:
    if trained_tokenizer(_dataset) is None:
        continue

    rule:
        name:
            f"tokenizer_{_dataset}"
        input:
            f"{OUT}/{_dataset}/metadata/filtered.parquet",
        output:
            trained_tokenizer(_dataset),
        params:
            vocab_size=ds_config(_dataset)["tokenizer_vocab_size"],
        log:
            f"{OUT}/{_dataset}/logs/tokenizer.log",
        benchmark:
            f"{OUT}/{_dataset}/benchmarks/tokenizer.tsv"
        shell:
            "dalle-data train-tokenizer {input:q} --vocab-size {params.vocab_size}"
            " -o {output:q} > {log} 2>&1"
