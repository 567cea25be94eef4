# Shards: all downloaded parts -> byte-reproducible training shards and the held-out eval
# split, each with its manifest; then the card and verify, which only read the shards and
# so run side by side.


rule finalize:
    input:
        parts=downloaded_parts,
        plan=f"{OUT}/{{dataset}}/download/plan.json",
        normalize=f"{OUT}/{{dataset}}/metadata/normalize.json",
        filter=f"{OUT}/{{dataset}}/metadata/filter.json",
        tokenizer=lambda wc: tokenizer_input(wc.dataset),
        against=dedup_against_indexes,
    output:
        manifest=f"{OUT}/{{dataset}}/shards/manifest.json",
        failures=f"{OUT}/{{dataset}}/shards/failures.parquet",
        index=f"{OUT}/{{dataset}}/shards/index.parquet",
        examples=f"{OUT}/{{dataset}}/shards/duplicate_examples.parquet",
        eval_manifest=f"{OUT}/{{dataset}}/eval/manifest.json",
        eval_failures=f"{OUT}/{{dataset}}/eval/failures.parquet",
        eval_index=f"{OUT}/{{dataset}}/eval/index.parquet",
        eval_examples=f"{OUT}/{{dataset}}/eval/duplicate_examples.parquet",
        build=f"{OUT}/{{dataset}}/shards/build.json",
    params:
        # <dataset_dir>/shards/manifest.json
        dataset_dir=subpath(output.manifest, ancestor=2),
        args=stage_args("finalize"),
    log:
        f"{OUT}/{{dataset}}/logs/finalize.log",
    benchmark:
        f"{OUT}/{{dataset}}/benchmarks/finalize.tsv"
    shell:
        "dalle-data finalize --dataset-dir {params.dataset_dir} {params.args} --no-card"
        " > {log} 2>&1"


rule card:
    """The dataset card: what was built from what, the accounting, retry rounds, and pictures."""
    input:
        manifest=f"{OUT}/{{dataset}}/shards/manifest.json",
        index=f"{OUT}/{{dataset}}/shards/index.parquet",
        examples=f"{OUT}/{{dataset}}/shards/duplicate_examples.parquet",
        eval_manifest=f"{OUT}/{{dataset}}/eval/manifest.json",
        eval_examples=f"{OUT}/{{dataset}}/eval/duplicate_examples.parquet",
        build=f"{OUT}/{{dataset}}/shards/build.json",
    output:
        card=f"{OUT}/{{dataset}}/shards/README.md",
        sheet=f"{OUT}/{{dataset}}/shards/contact_sheet.png",
        lengths=f"{OUT}/{{dataset}}/shards/caption_lengths.png",
        sizes=f"{OUT}/{{dataset}}/shards/image_sizes.png",
        duplicates=f"{OUT}/{{dataset}}/shards/duplicates.png",
    params:
        shards=subpath(input.manifest, parent=True),
    # The longest of the three jobs after finalize: first, so it ends with the two verifies.
    priority: 1
    log:
        f"{OUT}/{{dataset}}/logs/card.log",
    benchmark:
        f"{OUT}/{{dataset}}/benchmarks/card.tsv"
    shell:
        "dalle-data card {params.shards} > {log} 2>&1"


rule verify:
    """The dataset's end point: shards (training or eval) re-hashed against their manifest,
    some captions re-tokenized."""
    input:
        manifest=f"{OUT}/{{dataset}}/{{shardset}}/manifest.json",
        tokenizer=lambda wc: tokenizer_input(wc.dataset),
    output:
        f"{OUT}/{{dataset}}/{{shardset}}/verify.json",
    wildcard_constraints:
        shardset="shards|eval",
    params:
        shards=subpath(input.manifest, parent=True),
    log:
        f"{OUT}/{{dataset}}/logs/verify_{{shardset}}.log",
    benchmark:
        f"{OUT}/{{dataset}}/benchmarks/verify_{{shardset}}.tsv"
    shell:
        "dalle-data verify {params.shards} --retokenize 32 > {log} 2>&1"


if BUCKET:

    rule bucket_shards:
        """A dataset's verified shards folder (or its eval split), sent to
        <output_dir>/<dataset>/{shards,eval} by Snakemake's storage plugin: each file one
        PUT or a completed multipart upload."""
        input:
            verify=f"{OUT}/{{dataset}}/{{shardset}}/verify.json",
            card=card_of,
        output:
            storage(f"{BUCKET}/{{dataset}}/{{shardset}}"),
        wildcard_constraints:
            shardset="shards|eval",
        params:
            shards=subpath(input.verify, parent=True),
        log:
            f"{OUT}/{{dataset}}/logs/bucket_{{shardset}}.log",
        benchmark:
            f"{OUT}/{{dataset}}/benchmarks/bucket_{{shardset}}.tsv"
        shell:
            # {output} is the plugin's local staging folder: `put` hard-links the files
            # there, and the plugin uploads them when the job is done.
            "dalle-data put {params.shards} {output} > {log} 2>&1"
