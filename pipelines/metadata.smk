# Metadata: the offline sample source, then fetch -> normalize -> filter for every dataset.
# Outputs: {OUT}/{dataset}/raw/fetch.json, metadata/normalized.parquet (+ normalize.json),
# metadata/filtered.parquet (+ filter.json, dropped.parquet, report.json).

import os
import re
import shlex


def _sources(dataset):
    source = ds_config(dataset)["source"]
    return [source] if isinstance(source, str) else list(source)


def _is_local(source):
    return re.match(r"^(?i:https?|file)://", source) is None


def local_sources(dataset):
    """Local source files, so their rule (sample_source) runs first and edits refetch."""
    subset = ds_config(dataset).get("subset")
    return [s for s in _sources(dataset) + ([subset] if subset else []) if _is_local(s)]


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


_SAMPLE = config["datasets"].get("sample", {}).get("source")
if isinstance(_SAMPLE, str) and _is_local(_SAMPLE) and os.path.basename(_SAMPLE) == "sample.tsv":

    rule sample_source:
        """The bundled offline source (pictures + sample.tsv), generated, never downloaded."""
        output:
            _SAMPLE,
        params:
            folder=subpath(output[0], parent=True),
        log:
            f"{OUT}/sample/logs/sample_source.log",
        benchmark:
            f"{OUT}/sample/benchmarks/sample_source.tsv"
        threads: 1
        shell:
            "dalle-data make-sample {params.folder} > {log} 2>&1"


rule fetch:
    """Download (resuming) or link the dataset's source files; sha256s in fetch.json."""
    input:
        lambda wc: local_sources(wc.dataset),
    output:
        f"{OUT}/{{dataset}}/raw/fetch.json",
    params:
        args=lambda wc: fetch_args(wc.dataset),
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
        args=lambda wc: normalize_args(wc.dataset),
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
        args=lambda wc: filter_args(wc.dataset),
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
