# Training: a fresh parent from a model preset (the demo's `init_parent`), then
# `train-extend` driven by the config's `train:` section. The trained checkpoint's
# lineage name is computed before the run (dalle_data.train.planned_output) from the
# parent's hparams (or, for a parent init builds, its preset) and train.dataset/epochs.

import shlex
from pathlib import Path

from dalle_data.train import planned_output

TRAIN = config.get("train", {})


def trained_checkpoint():
    """`<train.output_dir>/<family>/<name>/<name>.pt` for the configured run."""
    return str(
        planned_output(
            Path(TRAIN["parent"]),
            TRAIN["dataset"],
            TRAIN["epochs"],
            Path(TRAIN["output_dir"]),
            parent_lineage=TRAIN.get("parent_lineage"),
            max_steps=TRAIN.get("max_steps"),
        )
    )


def trained_outputs():
    """The checkpoint and the files train-extend writes beside it."""
    folder = Path(trained_checkpoint()).parent
    outputs = {
        "checkpoint": trained_checkpoint(),
        "lineage": str(folder / "lineage.json"),
        "card": str(folder / "README.md"),
        "samples": str(folder / "samples.png"),
    }
    if TRAIN.get("evaluate_colours"):
        outputs["quality"] = str(folder / "quality.json")
    return outputs


def demo_outputs():
    """What `rule all` (the offline demo) builds: the trained checkpoint, card and samples."""
    return list(trained_outputs().values())


def train_options():
    """train-extend options from the config; unset optional keys are left out."""
    flags = {
        "batch-size": TRAIN.get("batch_size"),
        "learning-rate": TRAIN.get("learning_rate"),
        "clip-grad-norm": TRAIN.get("clip_grad_norm"),
        "seed": TRAIN.get("seed"),
        "num-workers": TRAIN.get("num_workers"),
        "save-every-n-steps": TRAIN.get("save_every_n_steps"),
        "vqgan-model-path": TRAIN.get("vqgan_model_path"),
        "vqgan-config-path": TRAIN.get("vqgan_config_path"),
        "parent-lineage": TRAIN.get("parent_lineage"),
    }
    words = [f"--{k} {shlex.quote(str(v))}" for k, v in flags.items() if v is not None]
    words += [f"--prompt {shlex.quote(p)}" for p in TRAIN.get("prompts", [])]
    if TRAIN.get("evaluate_colours"):
        words.append("--evaluate-colours")
    return " ".join(words)



rule init_parent:
    """A fresh parent (no lineage) from configs/models/<preset>.yaml and the training shards."""
    input:
        preset="configs/models/{preset}.yaml",
        shards=verified(TRAIN["dataset"]),
    output:
        f"{TRAIN['output_dir']}/init/{{preset}}.pt",
    params:
        shards=f"{OUT}/{TRAIN['dataset']}/shards",
        seed=TRAIN.get("seed", 0),
    log:
        f"{OUT}/{TRAIN['dataset']}/logs/init_{{preset}}.log",
    benchmark:
        f"{OUT}/{TRAIN['dataset']}/benchmarks/init_{{preset}}.tsv"
    threads: workflow.cores
    shell:
        "dalle-data init --preset {input.preset} --shards {params.shards}"
        " --seed {params.seed} -o {output} > {log} 2>&1"


rule train:
    """Continue train.parent on train.dataset for train.epochs; the output is lineage-named."""
    input:
        parent=TRAIN["parent"],
        shards=verified(TRAIN["dataset"]),
    output:
        **trained_outputs(),
    params:
        shards=f"{OUT}/{TRAIN['dataset']}/shards",
        epochs=TRAIN["epochs"],
        output_dir=TRAIN["output_dir"],
        options=train_options(),
    log:
        f"{OUT}/{TRAIN['dataset']}/logs/train.log",
    benchmark:
        f"{OUT}/{TRAIN['dataset']}/benchmarks/train.tsv"
    threads: workflow.cores
    shell:
        "dalle-data train-extend {input.parent} --shards {params.shards}"
        " --epochs {params.epochs} --output-dir {params.output_dir} {params.options}"
        " > {log} 2>&1"
