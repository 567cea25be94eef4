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
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dalle_data import locations
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
from dalle_data.model import evaluate as evaluation
from dalle_data.model import lineage as lin
from dalle_data.model.compatibility import check_compatible
from dalle_data.model.distributed import Dist, limit_cpu_threads, setup_distributed
from dalle_data.model.loader import Batch, LoaderSpec, ShardRef, batches, steps_per_epoch
from dalle_data.model.output_name import checkpoint_path, parent_history
from dalle_data.model.shard_cache import DEFAULT_SIZE, CacheSpec, default_dir, parse_size

DEFAULT_PROMPTS = (
    "An armchair in the shape of an avocado. An armchair imitating an avocado.",
    "A red tshirt with a black circle drawn on it.",
    "People playing soccer on a field.",
)
RUNS_DIR = ".runs"
LINEAGE = "lineage.json"
STEP_CHECKPOINTS_KEPT = 2
# A quality figure computed after training, shown in the model card.
Evaluation = Callable[[Any, Any, Path], dict[str, Any]]


@dataclass(frozen=True)
class TrainArgs:
    """The options of ``dalle-data train-extend`` (see its --help)."""

    parent: Path
    shards: tuple[Path | str, ...]
    epochs: Decimal
    output_dir: Path | str
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
    held_out: bool = True
    cache_dir: Path | None = None
    cache_size: int = parse_size(DEFAULT_SIZE)


@dataclass(frozen=True)
class ShardSet:
    """The training data: one dataset, possibly from several --shards folders."""

    dataset: str
    shards: tuple[ShardRef, ...]
    manifest_sha256: tuple[str, ...]
    tokenizer: dict[str, Any]
    image_size: int
    corrupt: tuple[str, ...]


def load_shard_set(dirs: Sequence[Path | str], *, skip_corrupt: bool) -> ShardSet:
    """Read and check the manifests of ``dirs``: one dataset, one tokenizer, shards intact.

    Remote folders (URLs) are checked by a listing (every shard there, at its size); their
    sha256s are checked by the cache when each shard arrives.
    """
    if not dirs:
        raise TrainError("no --shards folder given: pass the folder holding manifest.json")
    manifests = [(locations.normalize(d), read_manifest(d)) for d in dirs]
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
        if isinstance(path, Path) and not skip_corrupt:
            problems: dict[str, str] = {}
            try:
                verify(path)
            except ManifestError as err:
                raise TrainError(f"{err} (or pass --skip-corrupt to train without it)") from err
        else:
            problems = _shard_problems(path, m)
            if problems and not skip_corrupt:
                reason = next(iter(problems.values()))
                raise TrainError(f"{reason} (or pass --skip-corrupt to train without it)")
        corrupt += [str(locations.join(path, name)) for name in sorted(problems)]
        shards += [
            ShardRef(locations.join(path, s["name"]), s["samples"], s["sha256"], s["bytes"])
            for s in m["shards"]
            if s["name"] not in problems
        ]
    return ShardSet(
        dataset=datasets[0],
        shards=tuple(shards),
        manifest_sha256=tuple(locations.sha256(locations.join(p, MANIFEST)) for p, _ in manifests),
        tokenizer=dict(first["tokenizer"]),
        image_size=int(min(m["image_size"] for _, m in manifests)),
        corrupt=tuple(corrupt),
    )


def _shard_problems(shards_dir: Path | str, manifest: dict[str, Any]) -> dict[str, str]:
    """Why shards are not the ones the manifest describes, by name. Local: missing or not
    byte-identical. Remote: missing or of the wrong size in one listing (the cache checks
    each sha256 on arrival; an http(s) folder cannot be listed and is left to that check)."""
    if isinstance(shards_dir, Path):
        shards = tqdm(manifest["shards"], desc="check shards", unit=" shards", mininterval=2.0)
        found = {s["name"]: shard_problem(shards_dir / s["name"], s) for s in shards}
        return {name: problem for name, problem in found.items() if problem}
    if locations.scheme(shards_dir) in locations.READ_ONLY:
        return {}
    listed = locations.sizes(shards_dir)
    problems = {}
    for shard in manifest["shards"]:
        url, size = locations.join(shards_dir, shard["name"]), listed.get(shard["name"])
        if size is None:
            problems[shard["name"]] = f"shard {url} is missing: upload it again"
        elif size != shard["bytes"]:
            problems[shard["name"]] = (
                f"shard {url} has {size} bytes, the manifest says {shard['bytes']}: upload it again"
            )
    return problems


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


def _save_step(run_dir: Path, dalle: Any, progress: Progress) -> None:
    state = {
        "step": progress.step,
        "weights": dalle.state_dict(),
        "opt_state": progress.opt.state_dict(),
        "rng": torch.get_rng_state(),
        "losses": progress.losses[-1000:],
        "seen": progress.seen,
        "skipped": progress.skipped,
    }
    path = run_dir / f"step-{progress.step:06d}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for old in sorted(run_dir.glob("step-*.pt"))[:-STEP_CHECKPOINTS_KEPT]:
        old.unlink(missing_ok=True)


@dataclass
class Run:
    """Everything decided before the first step: parent, model, data, output name, run id."""

    ckpt: dict[str, Any]
    parent_name: str
    parent_sha: str
    history: list[dict[str, Any]]
    dalle: Any
    data: ShardSet
    spec: LoaderSpec
    total: int
    per_epoch: int
    epochs_done: Decimal
    segments: tuple[lin.Segment, ...]
    name: str
    family: str
    final: Path
    published: Path | str
    rid: str
    run_dir: Path
    held_out: evaluation.EvalSet | None = None
    parent_evals: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Progress:
    """What a step checkpoint saves and a resumed run restores."""

    opt: torch.optim.Optimizer
    step: int = 0
    losses: list[float] = field(default_factory=list)
    seen: int = 0
    skipped: int = 0
    resumed_from: int = 0
    seconds: float = 0.0


def train_extend(args: TrainArgs, evaluate: Evaluation | None = None) -> Path | str:
    """Train, write ``<output_dir>/<family>/<name>/<name>.pt`` + lineage.json + card; return it.

    ``evaluate(dalle, tokenizer, folder)`` may add a quality figure to the card (the demo's
    colour accuracy); the training core knows nothing of what it measures.
    """
    limit_cpu_threads()
    dist = setup_distributed()
    run = plan_run(args, dist)
    if _already_done(run.published, run.rid):
        if dist.is_root:
            tqdm.write(f"{run.published} is already the result of this run; nothing to do")
        return run.published
    if dist.is_root:
        score_parent(run, args)
    progress = start_or_resume(run, args, dist)
    train_steps(run, progress, args, dist)
    dist.barrier()
    if dist.is_root:
        record = save_result(run, progress, args, dist)
        finish_outputs(run, record, args, evaluate, score_output(run, args))
        publish(run)
        _remove_run_dir(run.run_dir)
    return run.published


def plan_run(args: TrainArgs, dist: Dist) -> Run:
    """Load and check parent and shards, size the run and name its output."""
    from dalle_data.model import checkpoint as ckpt_io

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
    data = load_shard_set(args.shards, skip_corrupt=args.skip_corrupt)
    check_compatible(parent_path, ckpt, data, dalle)
    held_out = (
        evaluation.held_out_split(args.shards, parent_path, ckpt, dalle, args.cache_dir)
        if args.held_out
        else None
    )
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
        cache=CacheSpec(args.cache_dir or default_dir(), args.cache_size),
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
    name = lin.model_name(lin.Architecture.from_hparams(ckpt["hparams"]), new_segments)
    family = lin.family(ckpt["vae_class_name"])
    parent_sha = sha256_file(parent_path)
    rid = run_id(args, parent_sha, data, dist.world_size)
    local_root, published_root = output_roots(args.output_dir, args.cache_dir)
    return Run(
        ckpt=ckpt,
        parent_name=parent_name,
        parent_sha=parent_sha,
        history=history,
        dalle=dalle.to(dist.device),
        data=data,
        spec=spec,
        total=total,
        per_epoch=per_epoch,
        epochs_done=epochs_done,
        segments=new_segments,
        name=name,
        family=family,
        final=checkpoint_path(local_root, family, name),
        published=locations.join(published_root, family, name, f"{name}.pt"),
        rid=rid,
        run_dir=local_root / RUNS_DIR / rid,
        held_out=held_out,
    )


def output_roots(output_dir: Path | str, cache_dir: Path | None) -> tuple[Path, Path | str]:
    """Where a run writes, and where its results go: the same local folder, or for a URL a
    staging folder in the cache (step checkpoints stay there, so a killed run resumes on
    this machine) whose results :func:`publish` uploads at the end."""
    target = locations.normalize(output_dir)
    if isinstance(target, Path):
        return target, target
    staging = (cache_dir or default_dir()) / "outputs" / sha256_bytes(target.encode())[:16]
    return staging, target


def publish(run: Run) -> None:
    """Upload a bucket run's results, the checkpoint and lineage.json last: _already_done
    takes those two as the sign of a finished upload."""
    if run.published == run.final:
        return
    folder = locations.parent(run.published)
    locations.put_tree(run.final.parent, folder, last=(run.final.name, LINEAGE))
    shutil.rmtree(run.final.parent)


def score_parent(run: Run, args: TrainArgs) -> None:
    """The parent's held-out scores, before any step (or resumed weights) changes the model."""
    if run.held_out is not None:
        record = evaluation.score_parent(
            run.dalle, Path(args.parent), run.parent_sha, run.held_out, batch_size=args.batch_size
        )
        run.parent_evals.append(record)


def score_output(run: Run, args: TrainArgs) -> list[dict[str, Any]]:
    """The saved checkpoint's held-out scores, stored in the eval.json beside it."""
    if run.held_out is None:
        return []
    record = evaluation.score(run.dalle, run.held_out, batch_size=args.batch_size)
    return [evaluation.store_record(run.final, record)]


def start_or_resume(run: Run, args: TrainArgs, dist: Dist) -> Progress:
    """The parent's optimizer state, or the latest step checkpoint of this same run."""
    params = [p for p in run.dalle.parameters() if p.requires_grad]
    progress = Progress(opt=torch.optim.Adam(params, lr=args.learning_rate))
    if run.ckpt.get("opt_state"):
        try:
            progress.opt.load_state_dict(run.ckpt["opt_state"])
        except (ValueError, KeyError) as err:
            raise TrainError(
                f"parent {args.parent}: its optimizer state does not fit the model ({err}); "
                "the checkpoint is inconsistent: re-save it without opt_state"
            ) from err
    resume = _latest_step_checkpoint(run.run_dir)
    if resume is not None:
        state = torch.load(resume, map_location="cpu", weights_only=True)
        run.dalle.load_state_dict(state["weights"])
        progress.opt.load_state_dict(state["opt_state"])
        torch.set_rng_state(state["rng"])
        progress.step, progress.losses = state["step"], list(state["losses"])
        progress.seen, progress.skipped = state["seen"], state["skipped"]
        if dist.is_root:
            where = f"{resume.name} (step {progress.step} of {run.total})"
            tqdm.write(f"resuming {run.rid} from {where}")
    for group in progress.opt.param_groups:
        group["lr"] = args.learning_rate
    progress.resumed_from = progress.step
    if progress.step == 0:
        torch.manual_seed(args.seed)
    return progress


def train_steps(run: Run, progress: Progress, args: TrainArgs, dist: Dist) -> None:
    """train_dalle.py's step (Adam, clip_grad_norm) until ``run.total``, saving step
    checkpoints every ``--save-every-n-steps``."""
    model: torch.nn.Module = run.dalle
    if dist.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            run.dalle, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
        )
    model.train()
    params = [p for p in run.dalle.parameters() if p.requires_grad]
    started, first_step = time.perf_counter(), progress.step
    bar = tqdm(
        total=run.total,
        initial=progress.step,
        desc=f"train {run.name}",
        unit="step",
        disable=not dist.is_root,
        mininterval=1.0,
    )
    while progress.step < run.total:
        epoch, start = divmod(progress.step, run.per_epoch)
        for batch in batches(run.spec, epoch, start):
            text, image, weight = _step_inputs(batch, dist.device)
            loss = model(text, image, return_loss=True) * weight
            progress.opt.zero_grad(set_to_none=True)
            loss.backward()
            value, counts = _reduce_step(loss.detach(), (len(batch.keys), batch.skipped), dist)
            progress.step += 1
            progress.seen += counts[0]
            progress.skipped += counts[1]
            if counts[0]:  # else every sample of the step was corrupt, on every rank
                torch.nn.utils.clip_grad_norm_(params, args.clip_grad_norm)
                progress.opt.step()
                progress.losses.append(value)
            rate = (progress.step - first_step) * args.batch_size / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{value:.4f}", samples_s=f"{rate:.0f}", refresh=False)
            bar.update()
            step = progress.step
            if step % args.save_every_n_steps == 0 and step < run.total and dist.is_root:
                _save_step(run.run_dir, run.dalle, progress)
            if step >= run.total:
                break
    bar.close()
    progress.seconds = time.perf_counter() - started


def save_result(run: Run, progress: Progress, args: TrainArgs, dist: Dist) -> dict[str, Any]:
    """The lineage-named checkpoint and lineage.json; returns the lineage record."""
    from dalle_data.model import checkpoint as ckpt_io

    step_record = {
        "run_id": run.rid,
        "parent": {"name": run.parent_name, "sha256": run.parent_sha},
        "dataset": run.data.dataset,
        "manifest_sha256": list(run.data.manifest_sha256),
        "shards": [str(p) for p in args.shards],
        "epochs": lin.format_epochs(run.epochs_done.quantize(Decimal("0.01"), ROUND_HALF_UP)),
        "steps": run.total,
        "steps_per_epoch": run.per_epoch,
        "samples_seen": progress.seen,
        "resumed_from_step": progress.resumed_from,
        "corrupt_shards_skipped": list(run.data.corrupt),
        "corrupt_samples_skipped": progress.skipped,
        "hyperparameters": {
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "clip_grad_norm": args.clip_grad_norm,
            "seed": args.seed,
            "max_steps": args.max_steps,
            "world_size": dist.world_size,
            "resize_ratio": run.spec.resize_ratio,
            "optimizer": "Adam",
        },
        "tokenizer": run.data.tokenizer,
        "lineage": lin.format_lineage(run.segments),
        "final_loss": sum(progress.losses[-20:]) / max(1, len(progress.losses[-20:])),
        "train_seconds": round(progress.seconds, 1),
        "parent_evals": run.parent_evals,
    }
    record = {
        "name": run.name,
        "family": run.family,
        "segments": lin.format_lineage(run.segments),
        "history": [*run.history, step_record],
    }
    ckpt_io.save_checkpoint(
        run.final,
        hparams=run.ckpt["hparams"],
        vae_params=run.ckpt.get("vae_params"),
        vae_class_name=run.ckpt["vae_class_name"],
        weights=run.dalle.state_dict(),
        epoch=int(run.ckpt.get("epoch") or 0) + math.ceil(run.epochs_done),
        opt_state=progress.opt.state_dict(),
        scheduler_state=None,
        lineage=record,
        tokenizer=run.data.tokenizer,
    )
    write_json(run.final.parent / LINEAGE, record)
    return record


def _remove_run_dir(run_dir: Path) -> None:
    for leftover in run_dir.glob("step-*.pt"):
        leftover.unlink()
    with contextlib.suppress(OSError):
        run_dir.rmdir()


def _already_done(final: Path | str, rid: str) -> bool:
    record = locations.join(locations.parent(final), LINEAGE)
    if not (locations.exists(final) and locations.exists(record)):
        return False
    history = json.loads(locations.read_bytes(record)).get("history") or []
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
    run: Run,
    record: dict[str, Any],
    args: TrainArgs,
    evaluate: Evaluation | None,
    evals: list[dict[str, Any]],
) -> None:
    """samples.png, the optional quality figure of ``evaluate``, README.md beside the checkpoint
    (with ``evals``, the checkpoint's held-out records)."""
    from dalle_data.formats import tokenizers
    from dalle_data.model import model_card as modelcard
    from dalle_data.model.generate import encode_prompts, generate_images, save_grid

    dalle, folder = run.dalle, run.final.parent
    step = record["history"][-1]
    tokenizer = tokenizers.load(step["tokenizer"]["spec"])
    samples = None
    if args.prompts:
        text = encode_prompts(tokenizer, args.prompts, dalle.text_seq_len)
        images = generate_images(dalle, text, num_images=args.samples_per_prompt, seed=args.seed)
        save_grid(images, folder / "samples.png", nrow=args.samples_per_prompt)
        samples = "samples.png"
    quality = evaluate(dalle, tokenizer, folder) if evaluate else None
    modelcard.write_card(
        folder / "README.md",
        name=record["name"],
        family=record["family"],
        hparams=run.ckpt["hparams"],
        vae_class_name=run.ckpt["vae_class_name"],
        history=record["history"],
        final_loss=step["final_loss"],
        prompts=list(args.prompts),
        samples_file=samples,
        quality=quality,
        evals=evals,
    )
