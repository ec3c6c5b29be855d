"""Can the toy's base draw its world? The probe behind docs/TOY.md's "A base that draws" (issue #37, step 4).

    PYTHONPATH=. python scripts/toy_drawing_probe.py docs/toy/drawing

`hdb toy`'s base was hdb's tiny SD1.5-shaped pipeline with a random VAE: it fits the world's latents well enough
to tell people apart by diffusion loss, but what it draws is noise. This probe replaces the random VAE by one
trained on the crowd's renders (seed 0's, the people `hdb toy` pre-trains its base on), pre-trains the base UNet on
its latents exactly as `hdb toy` does (`pretrain_base`), and draws 8 pictures per context. The autoencoder is
hdb/toy/drawing.py's, the one `hdb toy` now trains: diffusers' AutoencoderTiny (plain convolutions, TAESD's shape;
8x8x4 latents, the tiny UNet's) trained as a plain autoencoder on L1 + L2, with the error's colour part (each
pixel's error minus its mean over the channels) weighted `--chroma-weight` times. docs/toy/drawing's figures came
from the probe's own copy of that recipe, at the commit its probe.json records. Writes to the folder: recon.png
(held-out photos above their reconstructions), samples.png (row 1 "a photo of a person", row 2 "a black and white
photo of a person"), probe.json (settings, losses, seconds, the code's commit). About 12 minutes on 2 cores with
the defaults.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import AutoencoderTiny
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from hdb.diffusion import to_pixels
from hdb.generate import generate
from hdb.models import build_tiny_pipeline
from hdb.toy import experiment
from hdb.toy.drawing import COLOUR_WEIGHT, colourfulness, train_autoencoder
from hdb.toy.report import code_version, image_sheet
from hdb.toy.world import sample_people

SEED = 0
PICTURES = 8  # per context


@torch.no_grad()
def reconstruction_sheet(vae: AutoencoderTiny, photos: list[Image.Image]) -> tuple[Image.Image, dict]:
    """The photos above their reconstructions, and how far apart they are (mean |error| in [-1, 1] units, and the
    photos' and reconstructions' colourfulness: each pixel's mean |value - its channels' mean|)."""
    pixels = to_pixels(photos)
    rebuilt = vae.decode(vae.encode(pixels).latents).sample.clamp(-1, 1)

    figures = {
        "l1": round((rebuilt - pixels).abs().mean().item(), 4),
        "colourfulness_photos": round(colourfulness(pixels).mean().item(), 4),
        "colourfulness_reconstructions": round(colourfulness(rebuilt).mean().item(), 4),
    }
    return image_sheet([photos, VaeImageProcessor().postprocess(rebuilt, output_type="pil")]), figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--vae-steps", type=int, default=4000)
    parser.add_argument("--chroma-weight", type=float, default=COLOUR_WEIGHT)
    parser.add_argument("--vae-with-black-and-white", action="store_true", help="half the VAE's renders in grey")
    parser.add_argument("--base-steps", type=int, default=3000)
    args = parser.parse_args()
    torch.set_num_threads(2)
    started, record = time.perf_counter(), {"code": code_version(), "settings": vars(args) | {"out": str(args.out)}}
    config = experiment.ToyConfig(pretrain_steps=args.base_steps)
    crowd = sample_people(SEED, 0, config.pretrain_identities, config.pretrain_renders, 0, "crowd")
    in_context, contexts = experiment.crowd_in_context(crowd)  # what hdb toy's base learns from
    renders = [photo for person in crowd for photo in person.photos]  # all in colour

    vae, vae_losses = train_autoencoder(in_context if args.vae_with_black_and_white else renders, args.vae_steps,
                                        SEED, args.chroma_weight, progress=False)  # fmt: skip
    record["seconds_vae"] = round(time.perf_counter() - started, 1)
    held_out = sample_people(SEED, 2, 8, 1, 0, "test")  # the first 8 of hdb toy's held-out people
    sheet, record["reconstruction"] = reconstruction_sheet(vae, [p.photos[0] for p in held_out])
    args.out.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out / "recon.png")
    if args.base_steps:
        record |= draw_with_a_base(vae, in_context, contexts, config, args.out)
    record |= {"vae_loss_per_100": every(vae_losses, 100), "seconds_total": round(time.perf_counter() - started, 1)}
    (args.out / "probe.json").write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if "per_100" not in k}))


def draw_with_a_base(
    vae: AutoencoderTiny, in_context: list[Image.Image], contexts: torch.Tensor, config: experiment.ToyConfig, out: Path
) -> dict:
    """Pre-train the base UNet on `vae`'s latents of the crowd's renders as `hdb toy` does, and draw PICTURES per
    context into out/samples.png; its figures back."""
    pipe = build_tiny_pipeline("sd15", SEED)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae = vae
    latents, factor = experiment.calibrate_latents(pipe, in_context)  # unit-variance latents, as hdb toy's
    started = time.perf_counter()
    base_losses = experiment.pretrain_base(pipe, latents, contexts, config, SEED, progress=False)
    seconds = round(time.perf_counter() - started, 1)

    rows = [
        [generate(pipe, None, prompt, negative_prompt="", guidance=1.0, steps=25, seed=s)[0] for s in range(PICTURES)]
        for prompt in experiment.PROMPTS
    ]
    image_sheet(rows).save(out / "samples.png")
    return {"seconds_base": seconds, "latent_scaling_factor": factor, "base_loss_per_100": every(base_losses, 100)}


def every(losses: list[float], n: int) -> list[float]:
    """Means of n steps: a readable curve."""
    return [round(sum(losses[i : i + n]) / len(losses[i : i + n]), 4) for i in range(0, len(losses), n)]


if __name__ == "__main__":
    main()
