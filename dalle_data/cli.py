"""The ``dalle-data`` command line: thin typer wrappers over the library functions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Reproducible DALLE-pytorch training data and lineage-named checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str) -> None:
    """Print one clear error line and exit 1 (user or data error, not a bug)."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=1)


@app.command("plan-download")
def plan_download_cmd(
    filtered: Annotated[Path, typer.Option(help="filtered.parquet from the filter stage")],
    out: Annotated[Path, typer.Option(help="plan folder: <out>/<ds>/download")],
    rows_per_part: Annotated[int, typer.Option(help="rows per download part")] = 100_000,
    allow_file_urls: Annotated[
        bool, typer.Option(help="fetch non-http(s) URLs (only for the offline sample)")
    ] = False,
) -> None:
    """Split filtered rows into independent download parts (parts/part-NNNNN.parquet + plan.json)."""
    from dalle_data.download import DownloadError, plan_download

    try:
        plan = plan_download(
            filtered, out, rows_per_part=rows_per_part, allow_file_urls=allow_file_urls
        )
    except DownloadError as err:
        fail(str(err))
    typer.echo(f"{plan['input_rows']} rows in {len(plan['parts'])} parts, refused {plan['refused']}")


@app.command("download")
def download_cmd(
    part: Annotated[Path, typer.Option(help="a part parquet written by plan-download")],
    out: Annotated[Path, typer.Option(help="the part's folder: <out>/<ds>/downloaded/part-NNNNN")],
    image_size: Annotated[int, typer.Option(help="shorter side of stored images, px")] = 256,
    processes: Annotated[int, typer.Option(help="download processes")] = 1,
    thread_count: Annotated[int, typer.Option(help="threads per process")] = 32,
    timeout: Annotated[float, typer.Option(help="seconds before a request is given up")] = 10,
    retries: Annotated[int, typer.Option(help="retries after a failed request")] = 0,
    min_image_size: Annotated[int, typer.Option(help="refuse images with a smaller side")] = 64,
    max_aspect_ratio: Annotated[float, typer.Option(help="refuse longer/shorter above this")] = 3.0,
    distributor: Annotated[str, typer.Option(help="multiprocessing or pyspark")] = "multiprocessing",
    user_agent_token: Annotated[str, typer.Option(help="token in the User-Agent")] = "dalle-data",
) -> None:
    """Download one part's images with img2dataset (resized, webdataset output)."""
    from dalle_data.download import DownloadError, DownloadSettings, download_part

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
    )
    try:
        stats = download_part(part, out, settings)
    except DownloadError as err:
        fail(str(err))
    typer.echo(f"{part.name}: {stats.get('successes', 0)} of {stats['rows']} images")


@app.command("finalize")
def finalize_cmd(
    dataset_dir: Annotated[Path, typer.Option(help="<output_dir>/<dataset>")],
    dataset: Annotated[str, typer.Option(help="dataset name ([a-z0-9]+)")],
    tokenizer: Annotated[str, typer.Option(help="simple, hug:<json> or yttm:<model>")],
    image_size: Annotated[int, typer.Option(help="shorter side of stored images, px")] = 256,
    shard_size: Annotated[int, typer.Option(help="samples per shard")] = 1000,
) -> None:
    """Downloaded parts -> shards/<dataset>-NNNNN.tar, manifest.json and failures.parquet."""
    from dalle_data.download import DownloadError
    from dalle_data.manifest import ManifestError
    from dalle_data.shards import ShardError, finalize
    from dalle_data.tokenizers import TokenizerError

    try:
        manifest = finalize(
            dataset_dir,
            dataset=dataset,
            tokenizer_spec=tokenizer,
            image_size=image_size,
            shard_size=shard_size,
        )
    except (ShardError, ManifestError, DownloadError, TokenizerError) as err:
        fail(str(err))
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
    from dalle_data.manifest import VERIFY_RECORD, ManifestError, verify
    from dalle_data.tokenizers import TokenizerError

    try:
        report = verify(shards_dir, retokenize=retokenize)
    except (ManifestError, TokenizerError) as err:
        fail(str(err))
    write_json(shards_dir / VERIFY_RECORD, report)
    typer.echo(f"ok: {report['shards']} shards, {report['samples']} samples")


@app.command("card")
def card_cmd(
    shards_dir: Annotated[Path, typer.Argument(help="a shards folder with manifest.json")],
) -> None:
    """Write the dataset card README.md with contact sheet and histograms."""
    from dalle_data.card import write_card
    from dalle_data.manifest import ManifestError

    try:
        path = write_card(shards_dir)
    except ManifestError as err:
        fail(str(err))
    typer.echo(f"wrote {path}")


def main() -> None:
    app()
