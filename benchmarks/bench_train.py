"""train-extend vs train_dalle.py's --wds data path, same model, shards, steps and workers.

Run from the repo root: ``.venv/bin/python benchmarks/bench_train.py``. Writes
benchmarks/results/train.md. Baseline: a webdataset pipeline built the way train_dalle.py
--wds builds it (PIL open, tokenize the caption with DALLE-pytorch's HugTokenizer,
RandomResizedCrop + ToTensor, batched, WebLoader) feeding the same DALLE-pytorch training
step (Adam, clip_grad_norm). Both paths get the same batch size and loader workers. Each
measure runs once untimed per path (imports, page cache), then is repeated with the two
paths interleaved, the first one alternating, so that both see the same load on a shared
machine; medians are reported.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import dalle_data.compat  # noqa: E402,F401
from dalle_data.formats import tokenizers  # noqa: E402
from dalle_data.formats.manifest import write_manifest  # noqa: E402
from dalle_data.model import checkpoint as ckpt_io  # noqa: E402
from dalle_data.model import loader  # noqa: E402
from dalle_data.model.distributed import limit_cpu_threads  # noqa: E402
from dalle_data.model.init import init_parent  # noqa: E402
from dalle_data.model.train import TrainArgs, train_extend  # noqa: E402
from tests.helpers.tiny import write_preset, write_tiny_shards, write_tokenizer  # noqa: E402

from common import write_result  # noqa: E402

SHARD_SIZE = 256
STORED_PX = 96  # the JPEGs in the shards; crops of them are resized to the VAE's 64 px
IMAGE_PX = 64
TEXT_SEQ_LEN = 16
PRESET = """\
vae:
  class: DiscreteVAE
  params: {image_size: 64, num_tokens: 64, codebook_dim: 64, num_layers: 3, hidden_dim: 32}
dalle: {dim: 128, depth: 2, heads: 4, dim_head: 32, text_seq_len: 16, attn_types: [full]}
"""


def bench_shards(root: Path, samples: int) -> tuple[Path, Path]:
    """Shards of ``STORED_PX`` px JPEGs and their manifest; returns (shards dir, tokenizer)."""
    spec = write_tokenizer(root / "tokenizer.json")
    shards_dir = root / "bench" / "shards"
    records = write_tiny_shards(shards_dir, samples, SHARD_SIZE, dataset="bench", size=STORED_PX)
    write_manifest(
        shards_dir,
        dataset="bench",
        tokenizer=tokenizers.load(spec).record(),
        image_size=STORED_PX,
        shards=records,
        counts={"input_rows": samples, "dropped": {}, "failed": {}, "written": samples},
    )
    return shards_dir, root / "tokenizer.json"


def wds_loader(shards: list[str], tokenizer_path: Path, batch: int, workers: int, size: int):
    """train_dalle.py's --wds pipeline, as in DALLE-pytorch 1.6.6."""
    import webdataset as wds
    from dalle_pytorch.tokenizer import HugTokenizer
    from PIL import Image
    from torchvision import transforms as T

    tokenizer = HugTokenizer(str(tokenizer_path))
    preproc = T.Compose(
        [
            T.Lambda(lambda img: img.convert("RGB") if img.mode != "RGB" else img),
            T.RandomResizedCrop(size, scale=(0.75, 1.0), ratio=(1.0, 1.0)),
            T.ToTensor(),
        ]
    )

    def tokenize(s: bytes) -> torch.Tensor:
        return tokenizer.tokenize(s.decode("utf-8"), TEXT_SEQ_LEN, truncate_text=True).squeeze(0)

    dataset = (
        wds.WebDataset(shards, handler=wds.warn_and_continue, shardshuffle=False)
        .select(lambda item: "jpg" in item and "txt" in item)
        .map_dict(jpg=lambda b: Image.open(io.BytesIO(b)), txt=tokenize)
        .map_dict(jpg=preproc)
        .to_tuple("txt", "jpg")
        .batched(batch, partial=False)
    )
    return wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=workers)


def baseline_train(parent: Path, make_loader: Callable, steps: int) -> float:
    """Seconds for ``steps`` train_dalle.py-style steps, parent load included."""
    start = time.perf_counter()
    ckpt = ckpt_io.load_checkpoint(parent)
    dalle = ckpt_io.build_dalle(ckpt)
    params = [p for p in dalle.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    done = 0
    while done < steps:
        for text, images in make_loader():
            loss = dalle(text, images, return_loss=True)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            opt.step()
            done += 1
            if done == steps:
                break
    return time.perf_counter() - start


def interleaved(ours: Callable[[], float], base: Callable[[], float], repeats: int):
    """One untimed run each, then ``repeats`` pairs, alternating which path goes first."""
    ours(), base()
    got: tuple[list[float], list[float]] = ([], [])
    for r in range(repeats):
        if r % 2:
            got[1].append(base())
            got[0].append(ours())
        else:
            got[0].append(ours())
            got[1].append(base())
    return got


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2, help="loader epochs per timed run")
    parser.add_argument("--repeats", type=int, default=7, help="timed loader runs per path")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--train-repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    opts = parser.parse_args()
    limit_cpu_threads()  # what train-extend does; set here so both paths train alike
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        shards_dir, tok_path = bench_shards(tmp, opts.samples)
        parent = init_parent(
            write_preset(tmp / "p.yaml", PRESET), tmp / "p.pt", shards=[shards_dir]
        )
        tars = sorted(str(p) for p in shards_dir.glob("*.tar"))
        spec = loader.LoaderSpec(
            shards=tuple(loader.ShardRef(Path(t), SHARD_SIZE) for t in tars),
            batch_size=opts.batch_size,
            image_size=IMAGE_PX,
            text_seq_len=TEXT_SEQ_LEN,
            num_workers=opts.workers,
        )
        pipeline = wds_loader(tars, tok_path, opts.batch_size, opts.workers, IMAGE_PX)

        def ours_sps() -> float:
            start = time.perf_counter()
            n = sum(len(b.keys) for e in range(opts.epochs) for b in loader.batches(spec, e))
            return n / (time.perf_counter() - start)

        def wds_sps() -> float:
            start = time.perf_counter()
            n = sum(len(text) for _ in range(opts.epochs) for text, _ in pipeline)
            return n / (time.perf_counter() - start)

        runs = iter(range(10**6))

        def ours_train() -> float:
            start = time.perf_counter()
            train_extend(
                TrainArgs(
                    parent=parent, shards=(shards_dir,), epochs=Decimal(100),
                    output_dir=tmp / f"m{next(runs)}", batch_size=opts.batch_size,
                    learning_rate=1e-3, max_steps=opts.steps, num_workers=opts.workers,
                    prompts=(), save_every_n_steps=10**9,
                )
            )  # fmt: skip
            return opts.steps / (time.perf_counter() - start)

        def base_train() -> float:
            return opts.steps / baseline_train(parent, lambda: pipeline, opts.steps)

        load = interleaved(ours_sps, wds_sps, opts.repeats)
        train = interleaved(ours_train, base_train, opts.train_repeats)
    write_result("train", report(opts, load, train))


def report(opts: argparse.Namespace, load, train) -> str:
    """The markdown section: medians, their ratio, and the spread of per-pair ratios."""
    rows = []
    for label, (ours, base), unit in (
        (f"loader alone ({opts.epochs} epochs a run)", load, "samples/s"),
        (f"training ({opts.steps} steps a run)", train, "steps/s"),
    ):
        pairs = sorted(o / b for o, b in zip(ours, base, strict=True))
        ours_med, base_med = statistics.median(ours), statistics.median(base)
        digits = 0 if unit == "samples/s" else 2
        rows.append(
            f"| {label}, {unit} | {ours_med:.{digits}f} | {base_med:.{digits}f} | "
            f"**{ours_med / base_med:.2f}** | {pairs[0]:.2f}-{pairs[-1]:.2f} |"
        )
    command = (
        f".venv/bin/python benchmarks/bench_train.py --samples {opts.samples} "
        f"--epochs {opts.epochs} --repeats {opts.repeats} --steps {opts.steps} "
        f"--train-repeats {opts.train_repeats} --batch-size {opts.batch_size} "
        f"--workers {opts.workers}"
    )
    table = "\n".join(rows)
    return f"""### Training: `dalle-data train-extend` vs train_dalle.py `--wds`

Same parent (DALLE dim 128, depth 2, 64 image tokens from a {IMAGE_PX} px DiscreteVAE,
32-token vocabulary), same {opts.samples} samples of {STORED_PX} px JPEGs in
{opts.samples // SHARD_SIZE} shards, batch {opts.batch_size}, {opts.workers} loader
worker(s) on both paths. The baseline decodes with PIL, tokenizes captions on the fly with
DALLE-pytorch's HugTokenizer, crops with torchvision's RandomResizedCrop (to float tensors)
and batches with webdataset's WebLoader, as train_dalle.py --wds does. dalle-data reads
pre-tokenized ids, crops with PIL (DCT-scaled decode when the crop is 2x the target) and
ships uint8 batches. Loader: samples/s over {opts.epochs} epochs (worker start-up
included on both paths), median of {opts.repeats} runs per path. Training: steps/s of
{opts.steps} Adam steps, median of {opts.train_repeats} runs; train-extend's time includes
its pre-flight checks (parent load, manifest verify) and writing the checkpoint, the
baseline's includes loading the parent; both train with one intra-op thread. Each path
ran once untimed first; timed runs alternate which path goes first.

| measure | dalle-data | train_dalle.py --wds path | ratio of medians | per-run ratios |
|---|---|---|---|---|
{table}

Goals: loader ratio >= 1.5, training ratio >= 1.0.
Command: `{command}`
"""


if __name__ == "__main__":
    main()
