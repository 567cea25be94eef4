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


rule all:
    """The offline demo: sample shards -> small model -> extended checkpoint with its card."""
    input:
        demo_outputs(),
    default_target: True


rule cc12m_shards:
    input:
        built("cc12m"),


rule wit_shards:
    input:
        built("wit"),


rule yfcc_shards:
    input:
        built("yfcc"),


rule sample_shards:
    input:
        built("sample"),
