"""Where is the person lost between the personal weights and the pictures? (issue #37, after the three seeds)

    PYTHONPATH=. python scripts/toy_strength_probe.py docs/toy/seed2/work docs/toy/strength --seed 2

`hdb toy`'s personalised models identify people by diffusion loss but hardly by their pictures, guidance or not
(docs/TOY.md). This probe takes a finished run's base and recogniser (its work folder, kept by `hdb toy`), and
personalises its first `--people` held-out people from their one photo harder than `hdb toy` does, each way in
turn: the whole UNet trained on the photo with the base's own pre-training loop (`pretrain_base`, "a photo of a
person", `--unet-steps` at `--unet-lr`), and a plain rank-4 LoRA from zero by hdb's finetune ("a sks face",
`--lora-steps` at `--lora-lr`). Each model draws PICTURES per context, judged by the run's recogniser as
`hdb toy` judges its pictures. If the whole UNet draws the person, the base and its VAE can draw them, and what
the toy's personal weights lack is strength. Writes probe.json (settings, seconds, the code's commit, each way's
pictures summary) and samples.png (per way, the first person's photo and pictures, a row per context). About
6 minutes on 2 cores with the defaults.
"""

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from hdb.config import PersonalizeConfig
from hdb.diffusion import encode_images, to_pixels
from hdb.faces import AlignedFace
from hdb.families import denoiser
from hdb.generate import generate
from hdb.lidb import LiDB
from hdb.pipeline import PersonalPipeline
from hdb.toy.experiment import INSTANCE_PROMPTS, PROMPTS, Base, ToyConfig, pretrain_base, toy_world
from hdb.toy.pictures import PICTURES, galleries, load_recogniser, picture_summary, score_pictures
from hdb.toy.report import code_version, image_sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("work", type=Path, help="a finished `hdb toy` run's work folder (base/, recogniser/)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, required=True, help="the seed of that run")
    parser.add_argument("--people", type=int, default=16)
    parser.add_argument("--unet-steps", type=int, default=300)
    parser.add_argument("--unet-lr", type=float, default=1e-4)
    parser.add_argument("--lora-steps", type=int, default=300)
    parser.add_argument("--lora-lr", type=float, default=5e-3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = ToyConfig()
    _, _, test, _ = toy_world(config, args.seed)
    test = test[: args.people]
    base = Base.load(args.work / "base", args.seed)
    recogniser, _ = load_recogniser(args.work / "recogniser")
    gallery = galleries(recogniser, test)
    pipe, personal = base.pipe, PersonalPipeline(base.pipe)
    base_weights = {name: value.clone() for name, value in denoiser(pipe).state_dict().items()}
    with torch.no_grad():  # the base's calibrated latents (its scaling factor came back with it)
        photo_latents = encode_images(pipe, to_pixels([p.photos[0] for p in test])).float()
    unet_config = replace(config, pretrain_steps=args.unet_steps, pretrain_lr=args.unet_lr, pretrain_batch=4)
    lora_config = PersonalizeConfig(steps=args.lora_steps, learning_rate=args.lora_lr, relax="lora", seed=args.seed,
                                    progress=False)  # fmt: skip

    def whole_unet(k: int) -> list[list[Image.Image]]:
        pretrain_base(pipe, photo_latents[k : k + 1], torch.tensor([0]), unet_config, args.seed, progress=False)
        try:
            return draw(None, PROMPTS)
        finally:
            denoiser(pipe).load_state_dict(base_weights)  # the next person starts from the base

    def lora(k: int) -> list[list[Image.Image]]:
        personal.personalize(AlignedFace.from_crop(test[k].photos[0]), lora_config)
        return draw(personal.lidb, INSTANCE_PROMPTS)

    def draw(lidb: LiDB | None, prompts: tuple[str, ...]) -> list[list[Image.Image]]:
        return [
            generate(pipe, lidb, prompt, negative_prompt="", guidance=1.0, steps=config.sample_steps, seed=args.seed,
                     num_images=PICTURES)
            for prompt in prompts
        ]  # fmt: skip

    ways = {
        "whole_unet": (f"the whole UNet, {args.unet_steps} steps at lr {args.unet_lr:g}", whole_unet),
        "lora": (f"rank-4 LoRA from zero, {args.lora_steps} steps at lr {args.lora_lr:g}", lora),
    }
    record = {"code": code_version(), "settings": {k: str(v) for k, v in vars(args).items()}, "seconds": {}}
    sheet = []
    for name, (label, personalise) in ways.items():
        started, scores = time.perf_counter(), []
        for k in range(len(test)):
            pictures = personalise(k)
            scores.append(score_pictures(recogniser, gallery, pictures))
            if k == 0:
                sheet += [[test[0].photos[0], *row] for row in pictures]
        record["seconds"][name] = round(time.perf_counter() - started, 1)
        record[name] = picture_summary(label, scores)
        photo, grey = record[name]["photo"], record[name]["black_and_white"]
        print(f"{label}: photo AUC {photo['auc']:.3f} {photo['auc_interval']}, {photo['identified']} of {len(test)}; "
              f"b&w AUC {grey['auc']:.3f}; in context {record[name]['in_context']}", flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    image_sheet(sheet).save(args.out / "samples.png")
    (args.out / "probe.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
