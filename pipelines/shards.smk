# Shards: all downloaded parts -> byte-reproducible shards and manifest; then the card and
# verify, which only read the shards and so run side by side.


rule finalize:
    input:
        parts=downloaded_parts,
        plan=f"{OUT}/{{dataset}}/download/plan.json",
        normalize=f"{OUT}/{{dataset}}/metadata/normalize.json",
        filter=f"{OUT}/{{dataset}}/metadata/filter.json",
        tokenizer=lambda wc: tokenizer_input(wc.dataset),
    output:
        manifest=f"{OUT}/{{dataset}}/shards/manifest.json",
        failures=f"{OUT}/{{dataset}}/shards/failures.parquet",
        index=f"{OUT}/{{dataset}}/shards/index.parquet",
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
        build=f"{OUT}/{{dataset}}/shards/build.json",
    output:
        card=f"{OUT}/{{dataset}}/shards/README.md",
        sheet=f"{OUT}/{{dataset}}/shards/contact_sheet.png",
        lengths=f"{OUT}/{{dataset}}/shards/caption_lengths.png",
        sizes=f"{OUT}/{{dataset}}/shards/image_sizes.png",
    params:
        shards=subpath(input.manifest, parent=True),
    log:
        f"{OUT}/{{dataset}}/logs/card.log",
    benchmark:
        f"{OUT}/{{dataset}}/benchmarks/card.tsv"
    shell:
        "dalle-data card {params.shards} > {log} 2>&1"


rule verify:
    """The dataset's end point: shards re-hashed against the manifest, some captions re-tokenized."""
    input:
        manifest=f"{OUT}/{{dataset}}/shards/manifest.json",
        tokenizer=lambda wc: tokenizer_input(wc.dataset),
    output:
        f"{OUT}/{{dataset}}/shards/verify.json",
    params:
        shards=subpath(input.manifest, parent=True),
    log:
        f"{OUT}/{{dataset}}/logs/verify.log",
    benchmark:
        f"{OUT}/{{dataset}}/benchmarks/verify.tsv"
    shell:
        "dalle-data verify {params.shards} --retokenize 32 > {log} 2>&1"


if BUCKET:

    rule bucket_shards:
        """A dataset's verified shards folder, sent to <output_dir>/<dataset>/shards by
        Snakemake's storage plugin: each file one PUT or a completed multipart upload."""
        input:
            verify=f"{OUT}/{{dataset}}/shards/verify.json",
            card=f"{OUT}/{{dataset}}/shards/README.md",
        output:
            storage(f"{BUCKET}/{{dataset}}/shards"),
        params:
            shards=subpath(input.verify, parent=True),
        log:
            f"{OUT}/{{dataset}}/logs/bucket_shards.log",
        benchmark:
            f"{OUT}/{{dataset}}/benchmarks/bucket_shards.tsv"
        shell:
            # {output} is the plugin's local staging folder: `put` hard-links the files
            # there, and the plugin uploads them when the job is done.
            "dalle-data put {params.shards} {output} > {log} 2>&1"
