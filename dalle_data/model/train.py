"""``train-extend``: continue a DALLE-pytorch checkpoint on shards and name it by lineage.

Training is train_dalle.py's (Adam, clip_grad_norm, ``dalle(text, images,
return_loss=True)``) on batches from :mod:`dalle_data.model.loader`. Everything that can be
wrong with the inputs is checked before the first step. Step checkpoints make a run
resumable after kill -9: the data order is a function of ``(seed, epoch)``, so the
resumed run sees exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dalle_data.atomic import atomic_path, write_json
from dalle_data.errors import TrainError
from dalle_data.formats.manifest import (
    EVAL_SPLIT,
    MANIFEST,
    ManifestError,
    read_manifest,
    shard_problem,
    verify,
)
from dalle_data.hashing import sha256_bytes, sha256_file
from dalle_data.model import lineage as lin
from dalle_data.model.distributed import Dist, limit_cpu_threads, setup_distributed
from dalle_data.model.loader import Batch, LoaderSpec, ShardRef, batches, steps_per_epoch
from dalle_data.model.output_name import family_of, parent_history

DEFAULT_PROMPTS = (
    "An armchair in the shape of an avocado. An armchair imitating an avocado.",
    "A red tshirt with a black circle drawn on it.",
    "People playing soccer on a field.",
)
RUNS_DIR = ".runs"
STEP_CHECKPOINTS_KEPT = 2
# A quality figure computed after training, shown in the model card.
Evaluation = Callable[[Any, Any, Path], dict[str, Any]]


@dataclass(frozen=True)
class TrainArgs:
    """The options of ``dalle-data train-extend`` (see its --help)."""

    parent: Path
    shards: tuple[Path, ...]
    epochs: Decimal
    output_dir: Path
    batch_size: int = 16
    learning_rate: float = 3e-4
    clip_grad_norm: float = 0.5
    max_steps: int | None = None
    save_every_n_steps: int = 1000
    seed: int = 0
    num_workers: int = 0
    vqgan_model_path: Path | None = None
    vqgan_config_path: Path | None = None
    parent_lineage: str | None = None
    skip_corrupt: bool = False
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    samples_per_prompt: int = 4


@dataclass(frozen=True)
class ShardSet:
    """The training data: one dataset, possibly from several --shards folders."""

    dataset: str
    shards: tuple[ShardRef, ...]
    manifest_sha256: tuple[str, ...]
    tokenizer: dict[str, Any]
    image_size: int
    corrupt: tuple[str, ...]


def load_shard_set(dirs: Sequence[Path], *, skip_corrupt: bool) -> ShardSet:
    """Read and check the manifests of ``dirs``: one dataset, one tokenizer, shards intact."""
    if not dirs:
        raise TrainError("no --shards folder given: pass the folder holding manifest.json")
    manifests = [(Path(d), read_manifest(Path(d))) for d in dirs]
    held_out = [str(d) for d, m in manifests if m.get("split") == EVAL_SPLIT]
    if held_out:
        raise TrainError(
            f"{', '.join(held_out)} is a held-out eval split (manifest.json says split: eval): "
            "train on the dataset's shards/ folder and keep eval/ for `dalle-data evaluate`"
        )
    datasets = sorted({m["dataset"] for _, m in manifests})
    if len(datasets) > 1:
        raise TrainError(
            f"the --shards folders hold several datasets ({', '.join(datasets)}); a run "
            "trains on one dataset so its lineage name stays exact: run train-extend once "
            "per dataset, each continuing the previous output"
        )
    first_dir, first = manifests[0]
    for path, m in manifests[1:]:
        if m["tokenizer"].get("fingerprint") != first["tokenizer"].get("fingerprint"):
            raise TrainError(
                f"{path} was tokenized with a different tokenizer than {first_dir}: "
                "rebuild one of them with the same tokenizer"
            )
    shards: list[ShardRef] = []
    corrupt: list[str] = []
    for path, m in manifests:
        if skip_corrupt:
            bad = _corrupt_shards(path, m)
            corrupt += [str(path / name) for name in bad]
            shards += [
                ShardRef(path / s["name"], s["samples"])
                for s in m["shards"]
                if s["name"] not in bad
            ]
        else:
            try:
                verify(path)
            except ManifestError as err:
                raise TrainError(f"{err} (or pass --skip-corrupt to train without it)") from err
            shards += [ShardRef(path / s["name"], s["samples"]) for s in m["shards"]]
    return ShardSet(
        dataset=datasets[0],
        shards=tuple(shards),
        manifest_sha256=tuple(sha256_file(p / MANIFEST) for p, _ in manifests),
        tokenizer=dict(first["tokenizer"]),
        image_size=int(min(m["image_size"] for _, m in manifests)),
        corrupt=tuple(corrupt),
    )


def _corrupt_shards(shards_dir: Path, manifest: dict[str, Any]) -> set[str]:
    """Names of shards missing or not byte-identical to the manifest (skipped, counted)."""
    shards = tqdm(manifest["shards"], desc="check shards", unit=" shards", mininterval=2.0)
    return {s["name"] for s in shards if shard_problem(shards_dir / s["name"], s)}


def run_id(args: TrainArgs, parent_sha: str, data: ShardSet, world: int) -> str:
    """What makes two invocations the same run (and so resumable from each other)."""
    key = {
        "parent": parent_sha,
        "manifests": data.manifest_sha256,
        "corrupt": data.corrupt,
        "epochs": str(args.epochs),
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "clip_grad_norm": args.clip_grad_norm,
        "max_steps": args.max_steps,
        "seed": args.seed,
        "world_size": world,
    }
    return sha256_bytes(json.dumps(key, sort_keys=True).encode())[:16]


def _latest_step_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(run_dir.glob("step-*.pt"))
    return found[-1] if found else None


def _save_step(run_dir: Path, state: dict[str, Any]) -> None:
    path = run_dir / f"step-{state['step']:06d}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for old in sorted(run_dir.glob("step-*.pt"))[:-STEP_CHECKPOINTS_KEPT]:
        old.unlink(missing_ok=True)


def train_extend(args: TrainArgs, evaluate: Evaluation | None = None) -> Path:
    """Train, write ``<output_dir>/<family>/<name>/<name>.pt`` + lineage.json + card; return it.

    ``evaluate(dalle, tokenizer, folder)`` may add a quality figure to the card (the demo's
    colour accuracy); the training core knows nothing of what it measures.
    """
    from dalle_data.model import checkpoint as ckpt_io

    limit_cpu_threads()
    dist = setup_distributed()
    if args.batch_size % dist.world_size:
        raise TrainError(
            f"--batch-size {args.batch_size} is the global batch and must divide evenly "
            f"among {dist.world_size} processes"
        )
    if args.epochs <= 0:
        raise TrainError(f"--epochs must be positive, got {args.epochs}")
    parent_path = Path(args.parent)
    ckpt = ckpt_io.load_checkpoint(parent_path)
    segments, history, parent_name = parent_history(ckpt, parent_path, args.parent_lineage)
    dalle = ckpt_io.build_dalle(
        ckpt, vqgan_model_path=args.vqgan_model_path, vqgan_config_path=args.vqgan_config_path
    )
    hparams = ckpt["hparams"]
    data = load_shard_set(args.shards, skip_corrupt=args.skip_corrupt)
    _check_compatible(parent_path, ckpt, data, dalle)

    spec = LoaderSpec(
        shards=data.shards,
        batch_size=args.batch_size // dist.world_size,
        image_size=ckpt_io.model_int(dalle, "vae.image_size"),
        text_seq_len=ckpt_io.model_int(dalle, "text_seq_len"),
        seed=args.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        num_workers=args.num_workers,
        skip_corrupt=args.skip_corrupt,
    )
    per_epoch = steps_per_epoch(spec)
    total = max(1, int((args.epochs * per_epoch).to_integral_value()))
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    epochs_done = Decimal(total) / per_epoch
    try:
        new_segments = lin.extend(segments, data.dataset, epochs_done)
    except lin.LineageError as err:
        raise TrainError(f"{err} ({total} of {per_epoch} steps per epoch)") from err
    arch = lin.Architecture.from_hparams(hparams)
    name = lin.model_name(arch, new_segments)
    family = family_of(ckpt["vae_class_name"])
    final = Path(args.output_dir) / family / name / f"{name}.pt"
    parent_sha = sha256_file(parent_path)
    rid = run_id(args, parent_sha, data, dist.world_size)
    if _already_done(final, rid):
        if dist.is_root:
            tqdm.write(f"{final} is already the result of this run; nothing to do")
        return final
    run_dir = Path(args.output_dir) / RUNS_DIR / rid

    dalle = dalle.to(dist.device)
    params = [p for p in dalle.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.learning_rate)
    if ckpt.get("opt_state"):
        try:
            opt.load_state_dict(ckpt["opt_state"])
        except (ValueError, KeyError) as err:
            raise TrainError(
                f"parent {parent_path}: its optimizer state does not fit the model ({err}); "
                "the checkpoint is inconsistent: re-save it without opt_state"
            ) from err
    step, losses, seen, skipped = 0, [], 0, 0
    resume = _latest_step_checkpoint(run_dir)
    if resume is not None:
        state = torch.load(resume, map_location="cpu", weights_only=True)
        dalle.load_state_dict(state["weights"])
        opt.load_state_dict(state["opt_state"])
        torch.set_rng_state(state["rng"])
        step, losses = state["step"], list(state["losses"])
        seen, skipped = state["seen"], state["skipped"]
        if dist.is_root:
            tqdm.write(f"resuming {rid} from {resume.name} (step {step} of {total})")
    for group in opt.param_groups:
        group["lr"] = args.learning_rate
    resumed_from = step
    if step == 0:
        torch.manual_seed(args.seed)

    model: torch.nn.Module = dalle
    if dist.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            dalle, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
        )
    model.train()
    started, first_step = time.perf_counter(), step
    bar = tqdm(
        total=total,
        initial=step,
        desc=f"train {name}",
        unit="step",
        disable=not dist.is_root,
        mininterval=1.0,
    )
    while step < total:
        epoch, start = divmod(step, per_epoch)
        for batch in batches(spec, epoch, start):
            text, image, weight = _step_inputs(batch, dist.device)
            loss = model(text, image, return_loss=True) * weight
            opt.zero_grad(set_to_none=True)
            loss.backward()
            value, counts = _reduce_step(loss.detach(), (len(batch.keys), batch.skipped), dist)
            step += 1
            seen, skipped = seen + counts[0], skipped + counts[1]
            if counts[0]:  # else every sample of the step was corrupt, on every rank
                torch.nn.utils.clip_grad_norm_(params, args.clip_grad_norm)
                opt.step()
                losses.append(value)
            rate = (step - first_step) * args.batch_size / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{value:.4f}", samples_s=f"{rate:.0f}", refresh=False)
            bar.update()
            if step % args.save_every_n_steps == 0 and step < total and dist.is_root:
                _save_step(
                    run_dir,
                    {
                        "step": step,
                        "weights": dalle.state_dict(),
                        "opt_state": opt.state_dict(),
                        "rng": torch.get_rng_state(),
                        "losses": losses[-1000:],
                        "seen": seen,
                        "skipped": skipped,
                    },
                )
            if step >= total:
                break
    bar.close()
    dist.barrier()
    if not dist.is_root:
        return final
    elapsed = time.perf_counter() - started
    step_record = {
        "run_id": rid,
        "parent": {"name": parent_name, "sha256": parent_sha},
        "dataset": data.dataset,
        "manifest_sha256": list(data.manifest_sha256),
        "shards": [str(p) for p in args.shards],
        "epochs": lin.format_epochs(epochs_done.quantize(Decimal("0.01"), ROUND_HALF_UP)),
        "steps": total,
        "steps_per_epoch": per_epoch,
        "samples_seen": seen,
        "resumed_from_step": resumed_from,
        "corrupt_shards_skipped": list(data.corrupt),
        "corrupt_samples_skipped": skipped,
        "hyperparameters": {
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "clip_grad_norm": args.clip_grad_norm,
            "seed": args.seed,
            "max_steps": args.max_steps,
            "world_size": dist.world_size,
            "resize_ratio": spec.resize_ratio,
            "optimizer": "Adam",
        },
        "tokenizer": data.tokenizer,
        "lineage": lin.format_lineage(new_segments),
        "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "train_seconds": round(elapsed, 1),
    }
    record = {
        "name": name,
        "family": family,
        "segments": lin.format_lineage(new_segments),
        "history": [*history, step_record],
    }
    ckpt_io.save_checkpoint(
        final,
        hparams=hparams,
        vae_params=ckpt.get("vae_params"),
        vae_class_name=ckpt["vae_class_name"],
        weights=dalle.state_dict(),
        epoch=int(ckpt.get("epoch") or 0) + math.ceil(epochs_done),
        opt_state=opt.state_dict(),
        scheduler_state=None,
        lineage=record,
        tokenizer=data.tokenizer,
    )
    write_json(final.parent / "lineage.json", record)
    finish_outputs(dalle, final, record, hparams, ckpt["vae_class_name"], args, evaluate)
    for leftover in run_dir.glob("step-*.pt"):
        leftover.unlink()
    with contextlib.suppress(OSError):
        run_dir.rmdir()
    return final


def _check_compatible(path: Path, ckpt: dict[str, Any], data: ShardSet, dalle: Any) -> None:
    """The checks between parent and shards that train_dalle.py would only fail on later."""
    vocab = ckpt["hparams"].get("num_text_tokens")
    shards_vocab = data.tokenizer.get("vocab_size")
    if vocab != shards_vocab:
        raise TrainError(
            f"the shards were tokenized with {data.tokenizer.get('spec')!r} "
            f"({shards_vocab} tokens) but parent {path} has num_text_tokens={vocab}: rebuild "
            "the shards with the parent's tokenizer (config `tokenizer`) or pick a parent "
            "built for this vocabulary"
        )
    recorded = (ckpt.get("tokenizer") or {}).get("fingerprint")
    if recorded and recorded != data.tokenizer.get("fingerprint"):
        raise TrainError(
            f"the shards' tokenizer {data.tokenizer.get('spec')!r} has the parent's vocabulary "
            f"size but not its token ids (fingerprint {data.tokenizer.get('fingerprint')} vs "
            f"the parent's {recorded}): rebuild the shards with the tokenizer recorded in {path}"
        )
    if data.image_size < dalle.vae.image_size:
        raise TrainError(
            f"the shards hold {data.image_size}px images but the parent's VAE needs "
            f"{dalle.vae.image_size}px: rebuild the shards with image_size >= "
            f"{dalle.vae.image_size} (crops are only resized down)"
        )


def _already_done(final: Path, rid: str) -> bool:
    record = final.parent / "lineage.json"
    if not (final.is_file() and record.is_file()):
        return False
    history = json.loads(record.read_text(encoding="utf-8")).get("history") or []
    return bool(history) and history[-1].get("run_id") == rid


def _step_inputs(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The batch's text, images and loss weight. A batch whose every sample was corrupt
    (--skip-corrupt) gives one blank sample weighted 0: DALLE refuses an empty batch, and
    under DDP every rank must still take part in each backward."""
    if batch.keys:
        return batch.text.to(device, non_blocking=True), batch.image_float(device), 1.0
    text = torch.zeros((1, batch.text.shape[1]), dtype=batch.text.dtype, device=device)
    return text, torch.zeros((1, 3, *batch.image.shape[1:3]), device=device), 0.0


def _reduce_step(
    loss: torch.Tensor, counts: tuple[int, int], dist: Dist
) -> tuple[float, tuple[int, int]]:
    """The loss averaged over the ranks that had samples and the sample counts summed over
    ranks, in one all-reduce."""
    if dist.world_size == 1:
        return float(loss), counts
    had = 1.0 if counts[0] else 0.0
    extra = [torch.tensor(float(c), device=loss.device) for c in (had, *counts)]
    packed = torch.stack([loss.float(), *extra])
    torch.distributed.all_reduce(packed)
    return float(packed[0]) / max(1.0, float(packed[1])), (int(packed[2]), int(packed[3]))


def finish_outputs(
    dalle: Any,
    final: Path,
    record: dict[str, Any],
    hparams: dict[str, Any],
    vae_class_name: str,
    args: TrainArgs,
    evaluate: Evaluation | None,
) -> None:
    """samples.png, the optional quality figure of ``evaluate``, and README.md beside ``final``."""
    from dalle_data.formats import tokenizers
    from dalle_data.model import model_card as modelcard
    from dalle_data.model.generate import encode_prompts, generate_images, save_grid

    step = record["history"][-1]
    tokenizer = tokenizers.load(step["tokenizer"]["spec"])
    samples = None
    if args.prompts:
        text = encode_prompts(tokenizer, args.prompts, dalle.text_seq_len)
        images = generate_images(dalle, text, num_images=args.samples_per_prompt, seed=args.seed)
        save_grid(images, final.parent / "samples.png", nrow=args.samples_per_prompt)
        samples = "samples.png"
    quality = evaluate(dalle, tokenizer, final.parent) if evaluate else None
    modelcard.write_card(
        final.parent / "README.md",
        name=record["name"],
        family=record["family"],
        hparams=hparams,
        vae_class_name=vae_class_name,
        history=record["history"],
        final_loss=step["final_loss"],
        prompts=list(args.prompts),
        samples_file=samples,
        quality=quality,
    )
