# Training: a fresh parent from a model preset (the demo's `init_parent`), then
# `train-extend` driven by the config's `train:` section. The trained checkpoint's
# lineage name is computed before the run (dalle_data.model.output_name.planned_output) from the
# parent's hparams (or, for a parent init builds, its preset) and train.dataset/epochs.
# The functions these rules use are in common.smk.


rule init_parent:
    """A fresh parent (no lineage) from configs/models/<preset>.yaml and the training shards."""
    input:
        preset="configs/models/{preset}.yaml",
        shards=verified(TRAIN["dataset"]),
    output:
        f"{TRAIN['output_dir']}/init/{{preset}}.pt",
    params:
        shards=subpath(input.shards, parent=True),
        seed=TRAIN.get("seed", 0),
    log:
        f"{OUT}/{TRAIN['dataset']}/logs/init_{{preset}}.log",
    benchmark:
        f"{OUT}/{TRAIN['dataset']}/benchmarks/init_{{preset}}.tsv"
    threads: all_cores
    shell:
        "dalle-data init --preset {input.preset} --shards {params.shards}"
        " --seed {params.seed} -o {output} > {log} 2>&1"


rule train:
    """Continue train.parent on train.dataset for train.epochs; the output is lineage-named."""
    input:
        parent=TRAIN["parent"],
        shards=training_shards(TRAIN["dataset"]),
    output:
        **trained_outputs(),
    params:
        shards=training_shards_location,
        epochs=TRAIN["epochs"],
        # <output_dir>/<family>/<name>/<name>.pt (model.output_name.checkpoint_path)
        output_dir=subpath(output.checkpoint, ancestor=3),
        options=train_options(),
    log:
        f"{OUT}/{TRAIN['dataset']}/logs/train.log",
    benchmark:
        f"{OUT}/{TRAIN['dataset']}/benchmarks/train.tsv"
    threads: all_cores
    shell:
        "dalle-data train-extend {input.parent} --shards {params.shards}"
        " --epochs {params.epochs} --output-dir {params.output_dir} {params.options}"
        " > {log} 2>&1"


rule publish:
    """Copy the trained checkpoint's folder into the collection and re-index it."""
    input:
        **trained_outputs(),
    output:
        **collection_outputs(),
    params:
        folder=subpath(input.checkpoint, parent=True),
        root=subpath(output.index, parent=True),
    log:
        f"{OUT}/{TRAIN['dataset']}/logs/publish.log",
    benchmark:
        f"{OUT}/{TRAIN['dataset']}/benchmarks/publish.tsv"
    shell:
        "dalle-data publish {params.folder} {params.root} > {log} 2>&1"
