# Download: split filtered rows into parts (a checkpoint: the number of parts is known only
# once the metadata is filtered), then one img2dataset job per part.


wildcard_constraints:
    part="part-[0-9]{5}",


checkpoint plan_download:
    input:
        f"{OUT}/{{dataset}}/metadata/filtered.parquet",
    output:
        plan=f"{OUT}/{{dataset}}/download/plan.json",
        refused=f"{OUT}/{{dataset}}/download/refused.parquet",
        parts=directory(f"{OUT}/{{dataset}}/download/parts"),
    params:
        out=subpath(output.plan, parent=True),
        args=stage_args("plan"),
    log:
        f"{OUT}/{{dataset}}/logs/plan_download.log",
    benchmark:
        f"{OUT}/{{dataset}}/benchmarks/plan_download.tsv"
    shell:
        "dalle-data plan-download --filtered {input} --out {params.out} {params.args}"
        " > {log} 2>&1"


rule download:
    """One part through img2dataset, then retry rounds for rows that failed for a reason that
    can pass. Its images live in downloaded/<part>/ (kept when the rule reruns: a rerun,
    e.g. --forcerun download, fetches only rows still failing retryably); the output is
    the part's record."""
    input:
        f"{OUT}/{{dataset}}/download/parts/{{part}}.parquet",
    output:
        f"{OUT}/{{dataset}}/downloaded/{{part}}.json",
    threads: config["download"]["processes"]
    resources:
        http=1,
    params:
        out=subpath(output[0], strip_suffix=".json"),
        args=stage_args("download"),
    log:
        f"{OUT}/{{dataset}}/logs/download/{{part}}.log",
    benchmark:
        f"{OUT}/{{dataset}}/benchmarks/download/{{part}}.tsv"
    shell:
        "dalle-data download --part {input} --out {params.out} --processes {threads}"
        " {params.args} > {log} 2>&1"
