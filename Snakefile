# dalle-data: metadata -> filtered rows -> img2dataset -> WebDataset shards -> checkpoints.
# Contracts: ../shared/DESIGN.md and dalle_data/ARCHITECTURE.md. Rules only wire
# `dalle-data <command>` calls; the logic lives in the dalle_data package.

from snakemake.utils import min_version

min_version("9.0")


configfile: "configs/config.yaml"


include: "pipelines/common.smk"
include: "pipelines/metadata.smk"
include: "pipelines/tokenizer.smk"
include: "pipelines/download.smk"
include: "pipelines/shards.smk"
include: "pipelines/train.smk"


onstart:
    start_run()


onsuccess:
    end_run()


onerror:
    end_run()


rule all:
    """The offline demo: sample shards -> small model -> extended checkpoint with its card."""
    input:
        demo_outputs(),
    default_target: True


# `<name>_shards` for every configured dataset (cc12m_shards, wit_shards, yfcc_shards,
# sample_shards, and any dataset a --configfile or --config adds): no rule file to edit.
for _dataset in config["datasets"]:

    rule:
        name:
            f"{_dataset}_shards"
        input:
            built(_dataset),
