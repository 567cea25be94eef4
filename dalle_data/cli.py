"""The ``dalle-data`` command line: thin typer wrappers over the library functions."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from typer import _click
from typer.core import TyperGroup

from dalle_data.config import dataset_default, schema_default
from dalle_data.errors import DalleDataError, DalleDataWarning
from dalle_data.model.shard_cache import DEFAULT_SIZE
from dalle_data.settings import DOWNLOAD_OPTIONS


class _Commands(TyperGroup):
    """Turns every dalle-data error a command raises into one red line and exit code 1,
    and every dalle-data warning into one yellow line."""

    def invoke(self, ctx: _click.Context) -> Any:
        with warnings.catch_warnings():
            show = warnings.showwarning

            def one_line(
                message: Warning | str,
                category: type[Warning],
                filename: str,
                lineno: int,
                file: Any = None,
                line: str | None = None,
            ) -> None:
                if issubclass(category, DalleDataWarning):
                    typer.secho(f"warning: {message}", err=True, fg=typer.colors.YELLOW)
                else:
                    show(message, category, filename, lineno, file, line)

            warnings.showwarning = one_line
            try:
                return super().invoke(ctx)
            except DalleDataError as err:
                fail(str(err))


app = typer.Typer(
    cls=_Commands,
    help="Reproducible DALLE-pytorch training data and lineage-named checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# Options a config also sets take their defaults from the config's schema.
_FILTERS = {k: schema_default("filters", k) for k in ("min_words", "max_words")}
_DOWNLOAD = {
    key: schema_default("download", key)
    for key in ("processes", "rows_per_part", *DOWNLOAD_OPTIONS)
}
_IMAGE_SIZE = schema_default("image_size")
ImageSize = Annotated[int, typer.Option(help="shorter side of stored images, px")]
_SHARD_SIZE = schema_default("shard_size")
_EVAL_FRACTION = dataset_default("eval_fraction")
_EVAL_MAX_ROWS = dataset_default("eval_max_rows")
_MAX_DISTANCE = schema_default("dedup", "max_distance")


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        fail(f"expected KEY=VALUE, got {item!r}")
    return key, value


def _bounds(items: list[str] | None) -> dict[str, float]:
    bounds = {}
    for item in items or []:
        key, value = _key_value(item)
        try:
            bounds[key] = float(value)
        except ValueError:
            fail(f"expected COLUMN=NUMBER, got {item!r}")
    return bounds


def fail(message: str) -> None:
    """Print one clear error line and exit 1 (user or data error, not a bug)."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=1)


@app.command("fetch")
def fetch_cmd(
    source: Annotated[list[str], typer.Option(help="source URL or path (repeat for a list)")],
    raw_dir: Annotated[Path, typer.Option(help="where the files go: <out>/<ds>/raw")],
    subset: Annotated[str | None, typer.Option(help="YFCC subset list URL or path")] = None,
    select: Annotated[
        list[int] | None, typer.Option(help="fetch only these source indices (WIT wit_files)")
    ] = None,
) -> None:
    """Download (resuming) or link each source file into raw/ and record sha256s in fetch.json."""
    from dalle_data.pipeline.fetch import fetch

    record = fetch(source, raw_dir, subset=subset or None, select=select or None)
    typer.echo(f"fetched {len(record['files'])} files into {raw_dir}")


@app.command("normalize")
def normalize_cmd(
    format: Annotated[
        str, typer.Option(help="source format: cc12m, wit, yfcc, yfcc_sqlite, table or folder")
    ],
    raw_dir: Annotated[Path, typer.Option(help="the fetched files: <out>/<ds>/raw")],
    metadata_dir: Annotated[Path, typer.Option(help="output folder: <out>/<ds>/metadata")],
    language: Annotated[
        list[str] | None, typer.Option(help="WIT languages to keep (repeat; default en)")
    ] = None,
    license: Annotated[
        list[str] | None, typer.Option(help="YFCC license names to keep (default: every CC one)")
    ] = None,
    url_column: Annotated[str, typer.Option(help="table: the image URL column")] = "url",
    caption_column: Annotated[str, typer.Option(help="table: the caption column")] = "caption",
    license_column: Annotated[str | None, typer.Option(help="table: a license column")] = None,
    width_column: Annotated[str | None, typer.Option(help="table: an image width column")] = None,
    height_column: Annotated[str | None, typer.Option(help="table: an image height column")] = None,
    id_column: Annotated[
        str | None,
        typer.Option(help="table: a column of unique whole-number row ids (default: row number)"),
    ] = None,
    keep_column: Annotated[
        list[str] | None, typer.Option(help="table: a column copied into each sample's .json")
    ] = None,
    value_column: Annotated[
        list[str] | None, typer.Option(help="table: a numeric column the filters bound")
    ] = None,
    file_type: Annotated[
        str | None, typer.Option(help="table: csv, tsv, jsonl or parquet (default: by name)")
    ] = None,
    header: Annotated[bool, typer.Option(help="table: csv/tsv files start with a header")] = True,
    column_name: Annotated[
        list[str] | None, typer.Option(help="table: csv/tsv column names, in order (repeat)")
    ] = None,
    caption_lines: Annotated[
        str, typer.Option(help="folder: `first` caption line, or `each` line a sample")
    ] = "first",
) -> None:
    """Stream a source through its format adapter into normalized.parquet + normalize.json."""
    from dalle_data.pipeline.normalize import normalize
    from dalle_data.pipeline.sources import Options

    options = Options(
        languages=list(language or ["en"]),
        licenses=list(license or []),
        url_column=url_column,
        caption_column=caption_column,
        license_column=license_column,
        width_column=width_column,
        height_column=height_column,
        id_column=id_column,
        keep_columns=list(keep_column or []),
        value_columns=list(value_column or []),
        file_type=file_type,
        header=header,
        column_names=list(column_name or []),
        caption_lines=caption_lines,
    )
    record = normalize(format, raw_dir, metadata_dir, options)
    typer.echo(
        f"{record['input_rows']} rows in, {record['output_rows']} out, dropped {record['dropped']}"
    )


@app.command("filter")
def filter_cmd(
    metadata_dir: Annotated[Path, typer.Option(help="folder holding normalized.parquet")],
    fraction: Annotated[float, typer.Option(help="deterministic subset fraction (0-1]")] = 1.0,
    max_rows: Annotated[int | None, typer.Option(help="keep at most this many rows")] = None,
    allow_file_urls: Annotated[
        bool, typer.Option(help="let file: URLs through (only for the offline sample)")
    ] = False,
    min_words: Annotated[int, typer.Option(help="fewest words in a cleaned caption")] = _FILTERS[
        "min_words"
    ],
    max_words: Annotated[int, typer.Option(help="most words in a cleaned caption")] = _FILTERS[
        "max_words"
    ],
    blocklist: Annotated[
        list[str] | None, typer.Option(help="drop captions holding this word (repeat)")
    ] = None,
    workers: Annotated[int, typer.Option(help="caption cleaning processes (0 = all cores)")] = 0,
    min_value: Annotated[
        list[str] | None,
        typer.Option(help="COLUMN=NUMBER: drop rows below it (table value columns; repeat)"),
    ] = None,
    max_value: Annotated[
        list[str] | None,
        typer.Option(help="COLUMN=NUMBER: drop rows above it (table value columns; repeat)"),
    ] = None,
) -> None:
    """Subset, URL, value, caption and duplicate filters: filtered.parquet, dropped.parquet."""
    from dalle_data.pipeline.filter_stage import FilterOptions, run

    options = FilterOptions(
        fraction=fraction,
        max_rows=max_rows,
        allow_file_urls=allow_file_urls,
        min_words=min_words,
        max_words=max_words,
        blocklist=tuple(blocklist or ()),
        workers=workers,
        min_values=_bounds(min_value),
        max_values=_bounds(max_value),
    )
    record = run(metadata_dir, options)
    typer.echo(
        f"{record['input_rows']} rows in, {record['output_rows']} out, dropped {record['dropped']}"
    )


@app.command("make-sample")
def make_sample_cmd(
    out_dir: Annotated[Path, typer.Argument(help="folder for sample.tsv and images/")],
    count: Annotated[int, typer.Option(help="number of pictures")] = 2000,
) -> None:
    """Generate the bundled offline source: captioned shape pictures + a few bad entries."""
    from dalle_data.pipeline.sources.sample import make_sample

    record = make_sample(out_dir, count=count)
    typer.echo(f"wrote {record['rows']} rows to {out_dir / 'sample.tsv'}")


@app.command("train-tokenizer")
def train_tokenizer_cmd(
    source: Annotated[
        Path, typer.Argument(help="captions: a shards folder, a filtered.parquet or a text file")
    ],
    vocab_size: Annotated[int, typer.Option(help="tokens in the vocabulary (at least 258)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="the tokenizer.json to write")],
) -> None:
    """Train a small byte-level BPE (for `tokenizer: hug:<json>`) on a dataset's captions."""
    from dalle_data.pipeline.train_tokenizer import train_bpe

    record = train_bpe(source, vocab_size, output)
    typer.echo(f"trained {record['vocab_size']} tokens on {record['captions']} captions: {output}")


@app.command("plan-download")
def plan_download_cmd(
    filtered: Annotated[Path, typer.Option(help="filtered.parquet from the filter stage")],
    out: Annotated[Path, typer.Option(help="plan folder: <out>/<ds>/download")],
    rows_per_part: Annotated[int, typer.Option(help="rows per download part")] = _DOWNLOAD[
        "rows_per_part"
    ],
    allow_file_urls: Annotated[
        bool, typer.Option(help="fetch non-http(s) URLs (only for the offline sample)")
    ] = False,
) -> None:
    """Split filtered rows into independent download parts (parts/*.parquet + plan.json)."""
    from dalle_data.pipeline.download_plan import plan_download

    plan = plan_download(
        filtered, out, rows_per_part=rows_per_part, allow_file_urls=allow_file_urls
    )
    typer.echo(
        f"{plan['input_rows']} rows in {len(plan['parts'])} parts, refused {plan['refused']}"
    )


@app.command("download")
def download_cmd(
    part: Annotated[Path, typer.Option(help="a part parquet written by plan-download")],
    out: Annotated[Path, typer.Option(help="the part's folder: <out>/<ds>/downloaded/part-NNNNN")],
    image_size: ImageSize = _IMAGE_SIZE,
    processes: Annotated[int, typer.Option(help="download processes")] = _DOWNLOAD["processes"],
    thread_count: Annotated[int, typer.Option(help="threads per process")] = _DOWNLOAD[
        "thread_count"
    ],
    timeout: Annotated[
        float, typer.Option(help="seconds before a request is given up")
    ] = _DOWNLOAD["timeout"],
    retries: Annotated[int, typer.Option(help="retries after a failed request")] = _DOWNLOAD[
        "retries"
    ],
    min_image_size: Annotated[
        int, typer.Option(help="refuse images with a smaller side")
    ] = _DOWNLOAD["min_image_size"],
    max_aspect_ratio: Annotated[
        float, typer.Option(help="refuse longer/shorter above this")
    ] = _DOWNLOAD["max_aspect_ratio"],
    distributor: Annotated[str, typer.Option(help="multiprocessing or pyspark")] = _DOWNLOAD[
        "distributor"
    ],
    user_agent_token: Annotated[
        str, typer.Option(help="the crawler's name, first in the User-Agent")
    ] = _DOWNLOAD["user_agent_token"],
    contact: Annotated[
        str | None, typer.Option(help="a URL or e-mail address for the User-Agent")
    ] = _DOWNLOAD["contact"],
    max_requests_per_second_per_host: Annotated[
        float | None,
        typer.Option(help="requests per second to any one host, all processes (none: no limit)"),
    ] = _DOWNLOAD["max_requests_per_second_per_host"],
    retry_rounds: Annotated[
        int, typer.Option(help="later rounds for rows that failed for a reason that can pass")
    ] = _DOWNLOAD["retry_rounds"],
    retry_after_max: Annotated[
        float, typer.Option(help="longest wait before a round, whatever Retry-After says (s)")
    ] = _DOWNLOAD["retry_after_max"],
    retry_backoff: Annotated[
        float, typer.Option(help="wait before round 1 without Retry-After; doubles per round (s)")
    ] = _DOWNLOAD["retry_backoff"],
    spark_master: Annotated[
        str | None, typer.Option(help="pyspark: cluster master URL (default local[processes])")
    ] = None,
    spark_conf: Annotated[
        list[str] | None, typer.Option(help="pyspark: a Spark setting KEY=VALUE (repeat)")
    ] = None,
) -> None:
    """Download one part's images with img2dataset, then fetch again what failed for a reason
    that can pass (429, 5xx, timeouts, connection, DNS) in retry rounds; write <out>.json.

    Run again on a finished part, it fetches only the rows still failing retryably."""
    from dalle_data.pipeline.download import DownloadSettings
    from dalle_data.pipeline.retry import download_with_retries

    settings = DownloadSettings(
        image_size=image_size,
        processes=processes,
        thread_count=thread_count,
        timeout=timeout,
        retries=retries,
        min_image_size=min_image_size,
        max_aspect_ratio=max_aspect_ratio,
        distributor=distributor,
        user_agent_token=user_agent_token,
        contact=contact,
        max_requests_per_second_per_host=max_requests_per_second_per_host,
        retry_rounds=retry_rounds,
        retry_after_max=retry_after_max,
        retry_backoff=retry_backoff,
        spark_master=spark_master,
        spark_conf=tuple(_key_value(item) for item in spark_conf or ()),
    )
    record = download_with_retries(part, out, settings)
    typer.echo(
        f"{part.name}: {record['downloaded']} of {record['rows']} images after "
        f"{len(record['rounds'])} retry rounds; {record['retryable']} still retryable"
    )


@app.command("finalize")
def finalize_cmd(
    dataset_dir: Annotated[Path, typer.Option(help="<output_dir>/<dataset>")],
    dataset: Annotated[str, typer.Option(help="dataset name ([a-z0-9]+)")],
    tokenizer: Annotated[str, typer.Option(help="simple, hug:<json> or yttm:<model>")],
    image_size: ImageSize = _IMAGE_SIZE,
    shard_size: Annotated[int, typer.Option(help="samples per shard")] = _SHARD_SIZE,
    eval_fraction: Annotated[
        float, typer.Option(help="fraction of the filtered rows held out as the eval split")
    ] = _EVAL_FRACTION,
    eval_max_rows: Annotated[int, typer.Option(help="at most this many eval rows (0: no cap)")] = (
        _EVAL_MAX_ROWS
    ),
    max_distance: Annotated[
        int, typer.Option(help="pHash Hamming distance at or below which images are duplicates")
    ] = _MAX_DISTANCE,
    near_duplicates: Annotated[
        bool, typer.Option(help="compare perceptual hashes; off: exact copies (sha256) only")
    ] = True,
    dedup_against: Annotated[
        list[str] | None,
        typer.Option(help="NAME=DATASET_DIR of a built dataset whose images to drop (repeat)"),
    ] = None,
    card: Annotated[bool, typer.Option(help="also write the dataset card README.md")] = True,
) -> None:
    """Downloaded parts -> shards/ and the held-out eval/ split (each with manifest.json,
    index.parquet, failures.parquet), duplicates dropped; then the card."""
    from dalle_data.pipeline.dataset_card import write_card
    from dalle_data.pipeline.finalize import DedupOptions, finalize
    from dalle_data.pipeline.holdout import Holdout

    against = tuple((name, Path(folder)) for name, folder in map(_key_value, dedup_against or ()))
    manifest = finalize(
        dataset_dir,
        dataset=dataset,
        tokenizer_spec=tokenizer,
        image_size=image_size,
        shard_size=shard_size,
        holdout=Holdout(fraction=eval_fraction, max_rows=eval_max_rows or None),
        dedup_options=DedupOptions(
            max_distance=max_distance if near_duplicates else None, against=against
        ),
    )
    if card:
        write_card(dataset_dir / "shards")
    counts = manifest["counts"]
    typer.echo(f"{dataset}: wrote {counts['written']} samples in {len(manifest['shards'])} shards")


@app.command("verify")
def verify_cmd(
    shards_dir: Annotated[Path, typer.Argument(help="a shards folder with manifest.json")],
    retokenize: Annotated[
        int, typer.Option(help="re-tokenize this many captions and compare with tok.npy")
    ] = 0,
) -> None:
    """Re-hash and count every shard against manifest.json; write verify.json if all match."""
    from dalle_data.atomic import write_json
    from dalle_data.formats.manifest import VERIFY_RECORD, verify

    report = verify(shards_dir, retokenize=retokenize)
    write_json(shards_dir / VERIFY_RECORD, report)
    typer.echo(f"ok: {report['shards']} shards, {report['samples']} samples")


@app.command("put")
def put_cmd(
    source: Annotated[Path, typer.Argument(help="a local file or folder")],
    dest: Annotated[
        str, typer.Argument(help="where it goes: a folder or an s3://, gs://, hf:// URL")
    ],
) -> None:
    """Copy a file or a folder's files to DEST, each appearing complete or not at all.

    A bucket gets one PUT (or a completed multipart upload) per file; a local DEST gets hard
    links where possible. The pipeline uses it to stage a shards folder for Snakemake's
    storage plugin.
    """
    from dalle_data import locations

    locations.put(source, dest)
    typer.echo(f"{source} -> {dest}")


@app.command("card")
def card_cmd(
    shards_dir: Annotated[Path, typer.Argument(help="a shards folder with manifest.json")],
) -> None:
    """Write the dataset card README.md with contact sheet and histograms."""
    from dalle_data.pipeline.dataset_card import write_card

    path = write_card(shards_dir)
    typer.echo(f"wrote {path}")


@app.command("inspect")
def inspect_cmd(
    checkpoint: Annotated[
        Path,
        typer.Argument(help="a DALLE-pytorch checkpoint (.pt), or a VQGAN .ckpt or .yaml config"),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="print machine-readable JSON")] = False,
) -> None:
    """Print a checkpoint's architecture, VAE, lineage, epochs, size and name.

    On a taming VQGAN (weights, Lightning checkpoint or config): its codebook size,
    downsampling factor and image tokens at 256 px.
    """
    import json

    from dalle_data.model.checkpoint import inspect_file

    info, text = inspect_file(checkpoint)
    typer.echo(json.dumps(info, indent=2, sort_keys=True) if as_json else text)


VqganModel = Annotated[
    Path | None, typer.Option(help="VQGAN model .ckpt (taming parents; default ~/.cache/dalle)")
]
VqganConfig = Annotated[Path | None, typer.Option(help="VQGAN config .yml beside the model")]
CacheDir = Annotated[
    Path | None,
    typer.Option(help="local cache for remote shards (default ~/.cache/dalle-data/shards)"),
]
MirrorDir = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="where a bucket ROOT is mirrored (default ~/.cache/dalle-data/shards/collections/"
        "<hash of ROOT>): reruns download only changed objects",
    ),
]
CacheSize = Annotated[
    str, typer.Option(help="most bytes the cache keeps, e.g. 50GB (least recently used go)")
]


@app.command("train-extend")
def train_extend_cmd(
    parent: Annotated[Path, typer.Argument(help="the checkpoint to continue (.pt)")],
    shards: Annotated[
        list[str],
        typer.Option(
            help="a shards folder with manifest.json, or its s3://, gs://, hf:// or http(s):// "
            "URL (repeatable)"
        ),
    ],
    epochs: Annotated[str, typer.Option(help="epochs to train (may be fractional)")],
    output_dir: Annotated[
        str, typer.Option(help="writes <dir>/<family>/<name>/<name>.pt (a folder or a bucket URL)")
    ],
    batch_size: Annotated[int, typer.Option(help="global batch size (split across ranks)")] = 16,
    learning_rate: Annotated[float, typer.Option(help="Adam learning rate")] = 3e-4,
    clip_grad_norm: Annotated[float, typer.Option(help="gradient norm clip")] = 0.5,
    max_steps: Annotated[
        int | None, typer.Option(help="stop after this many steps (a partial epoch)")
    ] = None,
    save_every_n_steps: Annotated[int, typer.Option(help="step checkpoint interval")] = 1000,
    seed: Annotated[int, typer.Option(help="data order, crops and sampling seed")] = 0,
    num_workers: Annotated[int, typer.Option(help="loader processes per rank")] = 0,
    vqgan_model_path: VqganModel = None,
    vqgan_config_path: VqganConfig = None,
    parent_lineage: Annotated[
        str | None,
        typer.Option(help="the parent's lineage (e.g. cc12m_1E) when its name does not say"),
    ] = None,
    skip_corrupt: Annotated[
        bool, typer.Option(help="skip (and count) corrupt shards and samples instead of failing")
    ] = False,
    prompt: Annotated[
        list[str] | None, typer.Option(help="prompt for samples.png (repeatable)")
    ] = None,
    evaluate_colours: Annotated[
        bool, typer.Option(help="measure colour accuracy on the sample's palette, into the card")
    ] = False,
    held_out: Annotated[
        bool,
        typer.Option(
            "--eval/--no-eval",
            help="score parent and output on the dataset's eval split (<dataset>/eval) if any",
        ),
    ] = True,
    cache_dir: CacheDir = None,
    cache_size: CacheSize = DEFAULT_SIZE,
) -> None:
    """Continue PARENT on shards; write the lineage-named checkpoint, lineage.json and card.

    Remote shards stream through a local cache (fetched whole, sha256-checked, prefetched,
    least recently used evicted); a bucket --output-dir gets the results when they are done.
    """
    from decimal import Decimal, InvalidOperation

    from dalle_data import locations
    from dalle_data.model.shard_cache import parse_size
    from dalle_data.model.train import DEFAULT_PROMPTS, TrainArgs, train_extend

    try:
        epochs_value = Decimal(epochs)
    except InvalidOperation:
        fail(f"--epochs {epochs!r} is not a number: pass e.g. 1 or 0.5")
    args = TrainArgs(
        parent=parent,
        shards=tuple(locations.normalize(s) for s in shards),
        epochs=epochs_value,
        output_dir=locations.normalize(output_dir),
        batch_size=batch_size,
        learning_rate=learning_rate,
        clip_grad_norm=clip_grad_norm,
        max_steps=max_steps,
        save_every_n_steps=save_every_n_steps,
        seed=seed,
        num_workers=num_workers,
        vqgan_model_path=vqgan_model_path,
        vqgan_config_path=vqgan_config_path,
        parent_lineage=parent_lineage,
        skip_corrupt=skip_corrupt,
        prompts=tuple(prompt) if prompt else DEFAULT_PROMPTS,
        held_out=held_out,
        cache_dir=cache_dir,
        cache_size=parse_size(cache_size),
    )
    evaluate = None
    if evaluate_colours:
        from functools import partial

        from dalle_data.demo.colours import colour_quality

        evaluate = partial(colour_quality, seed=seed)
    final = train_extend(args, evaluate)
    typer.echo(str(final))


@app.command("generate")
def generate_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="a DALLE checkpoint (.pt)")],
    prompts: Annotated[list[str], typer.Argument(help="one or more text prompts")],
    output: Annotated[Path, typer.Option("-o", "--output", help="grid PNG to write")] = Path(
        "grid.png"
    ),
    num_images: Annotated[int, typer.Option(help="images per prompt (one grid row)")] = 4,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    top_k: Annotated[float, typer.Option(help="fraction of logits kept (filter_thres)")] = 0.9,
    tokenizer: Annotated[
        str | None, typer.Option(help="tokenizer spec, if the checkpoint records none")
    ] = None,
    vqgan_model_path: VqganModel = None,
    vqgan_config_path: VqganConfig = None,
) -> None:
    """Generate a grid of images, one row per prompt, from a checkpoint."""
    from dalle_data.model.generate import generate_grid

    path = generate_grid(
        checkpoint,
        prompts,
        output,
        num_images=num_images,
        seed=seed,
        top_k=top_k,
        tokenizer=tokenizer,
        vqgan_model_path=vqgan_model_path,
        vqgan_config_path=vqgan_config_path,
    )
    typer.echo(str(path))


@app.command("init")
def init_cmd(
    preset: Annotated[Path, typer.Option(help="a model preset, e.g. configs/models/tiny.yaml")],
    output: Annotated[Path, typer.Option("-o", "--output", help="the parent .pt to write")],
    shards: Annotated[
        list[Path] | None,
        typer.Option(help="shards folder: vocabulary, and images for a DiscreteVAE (repeatable)"),
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="tokenizer spec for the vocabulary (instead of shards)")
    ] = None,
    seed: Annotated[int, typer.Option(help="initialisation and VAE training seed")] = 0,
    vqgan_model_path: VqganModel = None,
    vqgan_config_path: VqganConfig = None,
) -> None:
    """Create a fresh parent checkpoint (no lineage yet) from a model preset."""
    from dalle_data.model.init import init_parent

    path = init_parent(
        preset,
        output,
        shards=tuple(shards or ()),
        tokenizer=tokenizer,
        seed=seed,
        vqgan_model_path=vqgan_model_path,
        vqgan_config_path=vqgan_config_path,
    )
    typer.echo(str(path))


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="the checkpoint to score (.pt)")],
    shards: Annotated[
        str,
        typer.Option(
            help="a held-out shard folder with manifest.json (<dataset>/eval), or its s3://, "
            "gs://, hf:// or http(s):// URL"
        ),
    ],
    batch_size: Annotated[
        int, typer.Option(help="samples per forward pass (the scores do not depend on it)")
    ] = 16,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda:N")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print the record as JSON")] = False,
    vqgan_model_path: VqganModel = None,
    vqgan_config_path: VqganConfig = None,
    clip_model: Annotated[
        str | None,
        typer.Option(help="also a CLIP score: an open_clip model name or config JSON"),
    ] = None,
    clip_weights: Annotated[
        Path | None,
        typer.Option(help="that CLIP model's weights, a local .safetensors or .pt state dict"),
    ] = None,
    clip_captions: Annotated[
        int, typer.Option(help="eval captions to generate an image for (CLIP score)")
    ] = 16,
    seed: Annotated[int, typer.Option(help="sampling seed of the CLIP score's images")] = 0,
    cache_dir: CacheDir = None,
) -> None:
    """Held-out text/image cross-entropy, loss and bits per image token; stored in eval.json."""
    import json

    from dalle_data.model.evaluate import evaluate_checkpoint, format_record

    if (clip_model is None) != (clip_weights is None):
        fail("pass --clip-model and --clip-weights together (weights are never downloaded)")
    clip = None
    if clip_model is not None:
        clip = {
            "model": clip_model,
            "weights": clip_weights,
            "captions": clip_captions,
            "seed": seed,
        }
    record = evaluate_checkpoint(
        checkpoint,
        shards,
        batch_size=batch_size,
        device=device,
        vqgan_model_path=vqgan_model_path,
        vqgan_config_path=vqgan_config_path,
        clip=clip,
        cache_dir=cache_dir,
    )
    typer.echo(json.dumps(record, indent=2, sort_keys=True) if as_json else format_record(record))


@app.command("evaluate-colours")
def evaluate_colours_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="a checkpoint trained on the sample")],
    per_colour: Annotated[int, typer.Option(help="images per colour")] = 8,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="also write the figures as JSON")
    ] = None,
    grid: Annotated[
        Path | None, typer.Option(help="also save the scored images, one row per colour (PNG)")
    ] = None,
) -> None:
    """Colour accuracy: generate "a <colour> circle" per sample colour and classify them."""
    import json

    from dalle_data.atomic import write_json
    from dalle_data.demo.colours import colour_accuracy
    from dalle_data.model import checkpoint as ckpt_io
    from dalle_data.model.generate import checkpoint_tokenizer
    from dalle_data.pipeline.sources.sample import COLOURS

    ckpt = ckpt_io.load_checkpoint(checkpoint)
    dalle = ckpt_io.build_dalle(ckpt)
    result = colour_accuracy(
        dalle,
        checkpoint_tokenizer(ckpt),
        dict(COLOURS),
        per_colour=per_colour,
        seed=seed,
        grid=grid,
    )
    if output is not None:
        write_json(output, result)
    typer.echo(json.dumps(result, indent=2))


@app.command("collection")
def collection_cmd(
    root: Annotated[
        str,
        typer.Argument(
            help="the collection folder (family folders inside), or its s3://, gs://, hf:// URL"
        ),
    ],
    cache_dir: MirrorDir = None,
) -> None:
    """Index a checkpoint collection: index.json, README.md front page, lineage.png, flags."""
    from dalle_data import locations
    from dalle_data.collection.index import FRONT_PAGE, write_index

    index = write_index(root, cache_dir=cache_dir)
    entries = index["checkpoints"]
    for entry in entries:
        for problem in entry["problems"]:
            typer.echo(f"flag: {entry['path']}: {problem}")
    for problem in index["problems"]:
        typer.echo(f"flag: {problem}")
    typer.echo(
        f"{len(entries)} checkpoints, {len(index['eval_sets'])} eval sets; "
        f"front page: {locations.join(root, FRONT_PAGE)}"
    )


@app.command("publish")
def publish_cmd(
    checkpoint_dir: Annotated[
        Path, typer.Argument(help="a train-extend output folder, <output_dir>/<family>/<name>")
    ],
    root: Annotated[
        str, typer.Argument(help="the collection folder, or its s3://, gs://, hf:// URL")
    ],
    cache_dir: MirrorDir = None,
) -> None:
    """Copy a checkpoint folder into ROOT/<family>/<name>/ (verified, atomic) and re-index."""
    from dalle_data import locations
    from dalle_data.collection.index import FRONT_PAGE
    from dalle_data.collection.publish import publish

    result = publish(checkpoint_dir, root, cache_dir=cache_dir)
    verb = "published" if result["published"] else "already published (same sha256)"
    typer.echo(f"{verb}: {result['path']}; front page: {locations.join(root, FRONT_PAGE)}")


@app.command("serve")
def serve_cmd(
    root: Annotated[
        str,
        typer.Argument(
            help="the collection folder (its index.json), or its s3://, gs://, hf:// or "
            "http(s):// URL"
        ),
    ],
    host: Annotated[
        str, typer.Option(help="address to listen on; 0.0.0.0 opens it to the network")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    max_images: Annotated[int, typer.Option(help="most images one request may ask for")] = 8,
    timeout: Annotated[
        float, typer.Option(help="seconds a request may take, waiting and loading included")
    ] = 300.0,
    max_loaded: Annotated[
        int, typer.Option(help="models kept in memory per device (least recently used leave)")
    ] = 2,
    queue: Annotated[
        int, typer.Option(help="requests that may wait for a device; more get 503 + Retry-After")
    ] = 16,
    vqgan_model_path: VqganModel = None,
    vqgan_config_path: VqganConfig = None,
    cache_dir: MirrorDir = None,
) -> None:
    """Serve a collection: dalle-service's HTTP API (/, /dalle-list, /dalle) and a page at /ui.

    Point dalle-service's front-end at it with
    https://rom1504.github.io/dalle-service/?back=http://127.0.0.1:8000
    A bucket or http(s) ROOT is served through a local copy in --cache-dir: each checkpoint
    is fetched when first asked for and checked against index.json's sha256.
    """
    from dalle_data import locations
    from dalle_data.serve.app import Settings, serve
    from dalle_data.serve.models import VqganFiles

    serve(
        Settings(
            root=locations.normalize(root),
            host=host,
            port=port,
            max_images=max_images,
            timeout=timeout,
            max_loaded=max_loaded,
            queue=queue,
            vqgan=VqganFiles(vqgan_model_path, vqgan_config_path),
            cache_dir=cache_dir,
        )
    )


# Built once at import (~30 ms of typer reading every command's signature): the stage
# server imports this module, so the stages it forks start with it built.
_command = typer.main.get_command(app)


def main() -> None:
    _command()


# `python -m dalle_data.cli` (and `torchrun -m dalle_data.cli`) run the app too.
if __name__ == "__main__":
    main()
