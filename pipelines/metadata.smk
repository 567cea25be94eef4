# Metadata: the offline sample source, then fetch -> normalize -> filter for every dataset.
# Outputs: {OUT}/{dataset}/raw/fetch.json, metadata/normalized.parquet (+ normalize.json),
# metadata/filtered.parquet (+ filter.json, dropped.parquet, report.json).

for _ds in DS.values():
    if _ds.generated_source is None:
        continue

    rule:
        name:
            f"sample_source_{_ds.name}"
        """The bundled offline source (pictures + sample.tsv), generated, never downloaded."""
        output:
            _ds.generated_source,
        params:
            folder=subpath(output[0], parent=True),
        log:
            f"{OUT}/{_ds.name}/logs/sample_source.log",
        benchmark:
            f"{OUT}/{_ds.name}/benchmarks/sample_source.tsv"
        threads: 1
        shell:
            "dalle-data make-sample {params.folder} > {log} 2>&1"


rule fetch:
    """Download (resuming) or link the dataset's source files; sha256s in fetch.json."""
    input:
        lambda wc: settings(wc.dataset).local_inputs,
    output:
        f"{OUT}/{{dataset}}/raw/fetch.json",
    params:
        args=stage_args("fetch"),
        raw_dir=lambda wc: f"{ds_dir(wc.dataset)}/raw",
    log:
        f"{OUT}/{{dataset}}/logs/fetch.log",
    benchmark:
        f"{OUT}/{{dataset}}/benchmarks/fetch.tsv"
    threads: 1
    resources:
        http=1,
    shell:
        "dalle-data fetch {params.args} --raw-dir {params.raw_dir} > {log} 2>&1"


rule normalize:
    """Each source file through its format adapter into the common schema."""
    input:
        f"{OUT}/{{dataset}}/raw/fetch.json",
    output:
        rows=f"{OUT}/{{dataset}}/metadata/normalized.parquet",
        dropped=f"{OUT}/{{dataset}}/metadata/normalize_dropped.parquet",
        record=f"{OUT}/{{dataset}}/metadata/normalize.json",
    params:
        args=stage_args("normalize"),
        raw_dir=lambda wc: f"{ds_dir(wc.dataset)}/raw",
        metadata_dir=lambda wc: f"{ds_dir(wc.dataset)}/metadata",
    log:
        f"{OUT}/{{dataset}}/logs/normalize.log",
    benchmark:
        f"{OUT}/{{dataset}}/benchmarks/normalize.tsv"
    threads: 2
    shell:
        "dalle-data normalize {params.args} --raw-dir {params.raw_dir}"
        " --metadata-dir {params.metadata_dir} > {log} 2>&1"


rule filter:
    """Subset, URL scheme, caption and duplicate filters; every dropped row kept with its rule."""
    input:
        rows=f"{OUT}/{{dataset}}/metadata/normalized.parquet",
        dropped=f"{OUT}/{{dataset}}/metadata/normalize_dropped.parquet",
        record=f"{OUT}/{{dataset}}/metadata/normalize.json",
    output:
        rows=f"{OUT}/{{dataset}}/metadata/filtered.parquet",
        dropped=f"{OUT}/{{dataset}}/metadata/dropped.parquet",
        record=f"{OUT}/{{dataset}}/metadata/filter.json",
        report=f"{OUT}/{{dataset}}/metadata/report.json",
    params:
        args=stage_args("filter"),
        metadata_dir=lambda wc: f"{ds_dir(wc.dataset)}/metadata",
    log:
        f"{OUT}/{{dataset}}/logs/filter.log",
    benchmark:
        f"{OUT}/{{dataset}}/benchmarks/filter.tsv"
    # Caption cleaning (ftfy) runs in this many processes; Snakemake caps it at --cores.
    threads: 8
    shell:
        "dalle-data filter {params.args} --workers {threads}"
        " --metadata-dir {params.metadata_dir} > {log} 2>&1"
