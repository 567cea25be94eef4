# Tokenizer: a dataset whose `tokenizer` is `hug:<path>` with <path> below output_dir gets
# a small byte-level BPE trained on its filtered captions (`tokenizer_vocab_size` tokens).
# Shard rules wait for it through tokenizer_input() in common.smk.

for _ds in DS.values():
    if _ds.trained_tokenizer is None:
        continue

    rule:
        name:
            f"tokenizer_{_ds.name}"
        input:
            f"{OUT}/{_ds.name}/metadata/filtered.parquet",
        output:
            _ds.trained_tokenizer,
        params:
            vocab_size=_ds.config["tokenizer_vocab_size"],
        log:
            f"{OUT}/{_ds.name}/logs/tokenizer.log",
        benchmark:
            f"{OUT}/{_ds.name}/benchmarks/tokenizer.tsv"
        shell:
            "dalle-data train-tokenizer {input:q} --vocab-size {params.vocab_size}"
            " -o {output:q} > {log} 2>&1"
