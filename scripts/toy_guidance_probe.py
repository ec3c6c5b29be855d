"""Does classifier-free guidance let the toy's personalised models draw their person? (issue #37)

    PYTHONPATH=. python scripts/toy_guidance_probe.py docs/toy/guidance

`hdb toy`'s pictures identify little (docs/toy/summary.md): its base never saw an empty prompt, so every model draws
without guidance, and what it draws stays the base's whoever it was personalised on. Stable Diffusion is trained with
a share of empty captions and sampled with guidance (the paper's evaluation: 7.5), which amplifies what the prompt, and
so the personal weights, change. This probe pre-trains the base as `hdb toy` does but with `--unconditional` of the
renders shown an empty prompt (`ToyConfig.pretrain_unconditional`), personalises the first `--people` held-out
people of `hdb toy --seed N` from their one photo by `hdb toy`'s zero + 200 steps and DreamBooth-LoRA, draws each at
every `--guidance`, and lets the toy's recogniser say whom each model drew (`hdb.toy.pictures`, as `hdb toy` scores
its pictures). Writes to the folder: probe.json (settings, seconds, the code's commit, every method x guidance's
pictures summary), samples.png (per sampled person and guidance: the photo, then each method's first two pictures
"a sks face" and its first one in black and white). The base is kept in the folder's work/ (`--resume`-style: a
second call with the same seed and base settings reads it back). About 15 minutes on 2 cores with the defaults
(docs/TOY.md, "Guidance").
"""

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from hdb.faces import AlignedFace
from hdb.generate import generate
from hdb.pipeline import PersonalPipeline
from hdb.toy.experiment import INSTANCE_PROMPTS, Base, Laps, ToyConfig, pretrained_base, toy_methods, toy_world
from hdb.toy.pictures import PICTURES, galleries, picture_summary, score_pictures, train_recogniser
from hdb.toy.report import code_version, image_sheet
from hdb.toy.resume import kept

METHODS = ("base", "zero_ft_long_lora", "dreambooth_lora")  # hdb toy's rows: no person, the longest finetunes
SAMPLED_PEOPLE = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--people", type=int, default=16, help="held-out people (hdb toy's first ones)")
    parser.add_argument("--unconditional", type=float, default=0.1, help="share of empty prompts in pre-training")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 4.0, 7.5])
    parser.add_argument("--base-steps", type=int, default=ToyConfig.pretrain_steps)
    parser.add_argument("--vae-steps", type=int, default=ToyConfig.vae_steps)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = replace(ToyConfig(), pretrain_unconditional=args.unconditional, pretrain_steps=args.base_steps,
                     vae_steps=args.vae_steps)  # fmt: skip
    lap = Laps(progress=True)
    record = {"code": code_version(), "settings": vars(args) | {"out": str(args.out)}, "seconds": lap.timings}

    crowd, _, test, _ = toy_world(config, args.seed)
    test = test[: args.people]
    work = args.out / "work" / f"base_seed{args.seed}_u{args.unconditional:g}_vae{args.vae_steps}_unet{args.base_steps}"
    base = kept(work, lambda: pretrained_base(crowd, config, args.seed, True), Base.save,
                lambda folder: Base.load(folder, args.seed))  # fmt: skip
    record["base_final_loss"] = sum(base.pretrain_losses[-100:]) / 100
    lap("base")
    recogniser, _ = train_recogniser(crowd, config.recogniser_steps, args.seed, progress=False)
    gallery = galleries(recogniser, test)
    lap("recogniser")

    personal, methods = PersonalPipeline(base.pipe), toy_methods(config)
    drawn = {name: {g: [] for g in args.guidance} for name in METHODS}  # [name][guidance][k]: PictureScores
    sheet: list[list[Image.Image]] = []
    for k, person in enumerate(test):
        for name in METHODS:
            method = methods[name]
            if method.steps:  # from zero, as hdb toy's rows
                personal.personalize(AlignedFace.from_crop(person.photos[0]), method.finetune(config, args.seed))
            else:
                personal.forget()
            for g in args.guidance:
                pictures = [
                    generate(base.pipe, personal.lidb, prompt, negative_prompt="", guidance=g,
                             steps=config.sample_steps, seed=args.seed, num_images=PICTURES)
                    for prompt in INSTANCE_PROMPTS
                ]  # fmt: skip
                drawn[name][g].append(score_pictures(recogniser, gallery, pictures))
                if k < SAMPLED_PEOPLE:
                    row = args.guidance.index(g) + k * len(args.guidance)
                    if len(sheet) <= row:
                        sheet.append([person.photos[0]])
                    sheet[row] += [pictures[0][0], pictures[0][1], pictures[1][0]]
        print(f"  person {k + 1}/{len(test)}", flush=True)
    lap("people")

    record["pictures"] = {
        name: {f"{g:g}": picture_summary(methods[name].label, people, name != "base") for g, people in by.items()}
        for name, by in drawn.items()
    }
    args.out.mkdir(parents=True, exist_ok=True)
    image_sheet(sheet).save(args.out / "samples.png")
    (args.out / "probe.json").write_text(json.dumps(record, indent=1))
    for name, by_guidance in record["pictures"].items():
        for g, summary in by_guidance.items():
            photo = summary.get("photo", {})
            print(
                f"{name:20s} guidance {g:>4s}: photo AUC {photo.get('auc', float('nan')):.3f} "
                f"({photo.get('identified', '-')} of {len(test)}), black_and_white AUC "
                f"{summary.get('black_and_white', {}).get('auc', float('nan')):.3f}, in context "
                f"{summary['in_context'][0]:.2f} / {summary['in_context'][1]:.2f}"
            )


if __name__ == "__main__":
    main()
