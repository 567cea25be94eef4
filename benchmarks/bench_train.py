"""train-extend vs train_dalle.py's --wds data path, same model, shards, steps and workers.

Run from the repo root: ``.venv/bin/python benchmarks/bench_train.py [--steps 60]``.
Writes benchmarks/results/train.md. Baseline: a webdataset pipeline built the way
train_dalle.py --wds builds it (PIL open, tokenize the caption with DALLE-pytorch's
HugTokenizer, RandomResizedCrop + ToTensor, batched, WebLoader) feeding the same
DALLE-pytorch training step (Adam, clip_grad_norm).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import dalle_data.compat  # noqa: E402,F401
from dalle_data import checkpoint as ckpt_io  # noqa: E402
from dalle_data import loader  # noqa: E402
from dalle_data.presets import init_parent  # noqa: E402
from dalle_data.train import TrainArgs, train_extend  # noqa: E402
from tests.helpers.tiny import write_dataset, write_preset  # noqa: E402

EPOCHS = 4  # loader passes timed: long enough that worker start-up is not what is measured
PRESET = """\
vae:
  class: DiscreteVAE
  params: {image_size: 64, num_tokens: 64, codebook_dim: 64, num_layers: 3, hidden_dim: 32}
dalle: {dim: 128, depth: 2, heads: 4, dim_head: 32, text_seq_len: 16, attn_types: [full]}
"""


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
        return tokenizer.tokenize(s.decode("utf-8"), 16, truncate_text=True).squeeze(0)

    dataset = (
        wds.WebDataset(shards, handler=wds.warn_and_continue)
        .select(lambda item: "jpg" in item and "txt" in item)
        .map_dict(jpg=lambda b: Image.open(io.BytesIO(b)), txt=tokenize)
        .map_dict(jpg=preproc)
        .to_tuple("txt", "jpg")
        .batched(batch, partial=False)
    )
    return wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=workers)


def baseline_train(parent: Path, batches, steps: int) -> float:
    start = time.perf_counter()
    ckpt = ckpt_io.load_checkpoint(parent)
    dalle = ckpt_io.build_dalle(ckpt)
    params = [p for p in dalle.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    done = 0
    while done < steps:
        for text, images in batches():
            loss = dalle(text, images, return_loss=True)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            opt.step()
            done += 1
            if done == steps:
                break
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        shards_dir = write_dataset(tmp, opts.samples, 256, dataset="bench", image_size=96)
        tok_path = tmp / "tokenizer.json"
        parent = init_parent(
            write_preset(tmp / "p.yaml", PRESET), tmp / "p.pt", shards=[shards_dir]
        )
        tars = sorted(str(p) for p in shards_dir.glob("*.tar"))
        refs = tuple(loader.ShardRef(Path(t), 256) for t in tars)
        spec = loader.LoaderSpec(
            shards=refs, batch_size=opts.batch_size, image_size=64, text_seq_len=16,
            num_workers=opts.workers,
        )  # fmt: skip

        def ours_epoch() -> float:
            start = time.perf_counter()
            n = sum(len(b.keys) for e in range(EPOCHS) for b in loader.batches(spec, e))
            return n / (time.perf_counter() - start)

        def wds_epoch() -> float:
            start = time.perf_counter()
            n = 0
            for _ in range(EPOCHS):
                dl = wds_loader(tars, tok_path, opts.batch_size, opts.workers, 64)
                n += sum(len(text) for text, _ in dl)
            return n / (time.perf_counter() - start)

        ours_epoch(), wds_epoch()  # warm the page cache and imports
        ours_sps, wds_sps = ours_epoch(), wds_epoch()

        start = time.perf_counter()
        train_extend(
            TrainArgs(
                parent=parent, shards=(shards_dir,), epochs=Decimal(100), output_dir=tmp / "m",
                batch_size=opts.batch_size, learning_rate=1e-3, max_steps=opts.steps,
                num_workers=opts.workers, prompts=(), save_every_n_steps=10**9,
            )
        )  # fmt: skip
        ours_train = time.perf_counter() - start
        base_train = baseline_train(
            parent,
            lambda: wds_loader(tars, tok_path, opts.batch_size, opts.workers, 64),
            opts.steps,
        )
    ours_steps, base_steps = opts.steps / ours_train, opts.steps / base_train
    train_ratio, load_ratio = ours_steps / base_steps, ours_sps / wds_sps
    command = (
        f".venv/bin/python benchmarks/bench_train.py --samples {opts.samples} "
        f"--steps {opts.steps} --batch-size {opts.batch_size} --workers {opts.workers}"
    )
    text = f"""### Training: `dalle-data train-extend` vs train_dalle.py `--wds`

Same parent (DALLE dim 128, depth 2, 64 image tokens from a 64 px DiscreteVAE, 32-token
vocabulary), same {opts.samples} samples of 96 px JPEGs in 4 shards, batch
{opts.batch_size}, {opts.workers} loader worker(s), {opts.steps} Adam steps.
The baseline loop decodes with PIL, tokenizes captions on the fly with DALLE-pytorch's
HugTokenizer, crops with torchvision's RandomResizedCrop and batches with webdataset's
WebLoader, as train_dalle.py --wds does. train-extend's time includes its pre-flight
checks (parent load, manifest verify) and writing the checkpoint; the baseline's
includes loading the parent. Both run in one process after train-extend set torch to
one intra-op thread on CPU, so both train with the same thread count.

| measure | dalle-data | train_dalle.py --wds path | ratio |
|---|---|---|---|
| loader alone, samples/s ({EPOCHS} epochs) | {ours_sps:.0f} | {wds_sps:.0f} | {load_ratio:.2f} |
| training, steps/s ({opts.steps} steps) | {ours_steps:.2f} | {base_steps:.2f} | {train_ratio:.2f} |

Goals: loader ratio >= 1.5, training ratio >= 1.0.
Command: `{command}`
"""
    out = ROOT / "benchmarks" / "results" / "train.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
