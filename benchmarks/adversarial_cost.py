"""Per-step cost of the VQ-VAE's adversarial term (patch discriminator) on this machine.

Runs the real training step (`AutoencoderStage.train_step`) of a config's VQ-VAE on random
volumes of the config's shape and batch, with and without the discriminator, fp32 and bf16
autocast, the four variants alternating step by step (so machine drift hits all alike); prints
one JSON document with the median seconds per step of each and the ratios.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/adversarial_cost.py --config brain64_adv \\
        --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mri_vqvae.config import ExperimentConfig, load_config  # noqa: E402
from mri_vqvae.core.precision import cpu_bf16_support  # noqa: E402
from mri_vqvae.models import registry  # noqa: E402
from mri_vqvae.training.adversarial import build_adversary  # noqa: E402
from mri_vqvae.training.autoencoder_stage import AutoencoderStage  # noqa: E402
from mri_vqvae.training.session import Session  # noqa: E402


def _session(config: ExperimentConfig, adversarial: bool, precision: str) -> Session:
    """A session over a fresh VQ-VAE (and discriminator) at the step the adversary joins."""
    tc = config.train_vqvae.model_copy(update={"precision": precision, "device": "cpu"})
    torch.manual_seed(config.seed)
    model = registry.build_model(config.autoencoder)
    adversary = (build_adversary(tc, config.data.spatial_size, config.seed, torch.device("cpu"))
                 if adversarial else None)
    stage = AutoencoderStage(train=tc, model_config=config.autoencoder, model=model,
                             train_ds=None, val_ds=None, manifest_digest="",  # type: ignore
                             spacing=tuple(config.data.spacing), adversary=adversary)
    s = Session.open(stage, config, torch.device("cpu"))
    stage.on_start(s, fresh=True)
    s.step = tc.adversarial_start_step
    return s


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="brain64_adv", help="shipped config name or YAML path")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    if config.train_vqvae.adversarial_weight == 0:
        p.error(f"{args.config}: train_vqvae.adversarial_weight is 0; pick a config with one")
    tc = config.train_vqvae
    batch = {"image": torch.rand(tc.batch_size, 1, *config.data.spatial_size,
                                 generator=torch.Generator().manual_seed(0))}
    variants = {(adv, prec): _session(config, adv, prec)
                for prec in ("fp32", "bf16") for adv in (False, True)}
    times: dict[tuple[bool, str], list[float]] = {k: [] for k in variants}
    for repeat in range(args.repeats + 1):  # the first round warms up, untimed
        for key, s in variants.items():
            started = time.perf_counter()
            s.stage.train_step(s, batch)
            if repeat:
                times[key].append(time.perf_counter() - started)
    median = {f"{'adversarial' if adv else 'plain'}_{prec}": statistics.median(t)
              for (adv, prec), t in times.items()}
    ratios = {prec: median[f"adversarial_{prec}"] / median[f"plain_{prec}"]
              for prec in ("fp32", "bf16")}
    print(json.dumps({
        "config": config.name, "shape": list(config.data.spatial_size), "batch": tc.batch_size,
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "discriminator": {"channels": tc.discriminator_channels,
                          "layers": tc.discriminator_layers},
        "median_step_s": median, "adversarial_over_plain": ratios,
        "cpu_bf16": cpu_bf16_support()[1],
        "torch": torch.__version__,
    }, indent=2))


if __name__ == "__main__":
    main()
