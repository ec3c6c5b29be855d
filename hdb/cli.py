"""`python -m hdb ...`: the command line. Each subcommand is a thin wrapper over a library function.

Every option that is a setting is made from its declaration (a stage's config in hdb.config, a command's options in
hdb.options) by hdb.arguments: its default, type, help and choices are the dataclass field's own, its flag
`hdb.terms`', and `config_from_args` builds the config back from the parsed options. A command declares by hand only
its inputs (files, photos, a prompt, a hypernetwork to load). Library errors name settings as Python does; `main`
prints them with the command line's flags instead (`hdb.terms.cli_terms`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from hdb.arguments import config_from_args, config_option, config_options
from hdb.config import (
    FILE_DTYPES,
    LIDB_LAYERS,
    MAX_PHOTOS,
    DatasetSource,
    DecoderConfig,
    GenerateOptions,
    HypernetTrainConfig,
    LiDBConfig,
    PersonalizeConfig,
    PreoptimizeConfig,
)
from hdb.console import quiet_libraries
from hdb.errors import HdbError
from hdb.files import check_regular_file, shown, special_kind
from hdb.options import (
    HYPERNET_HELP,
    BenchOptions,
    BenchTrainingOptions,
    CacheOptions,
    EvalOptions,
    ExportOptions,
    ModelOptions,
    PushOptions,
    TinyModelOptions,
    ToyOptions,
)
from hdb.terms import cli_terms

if TYPE_CHECKING:
    import torch

    from hdb.cache import TrainingData
    from hdb.hub import Upload
    from hdb.pipeline import PersonalPipeline

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # pictures the CLI writes (Pillow picks the format)


def _quiet_model_loading() -> None:
    """No per-file load bars (imported only by commands that load models: diffusers takes seconds to import)."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


# ----------------------------------------------------------------------------- options from config dataclasses


def check_output(path: Path, suffixes: tuple[str, ...], inputs: list[Path | None] = ()) -> Path:
    """Refuse, before any model loads, an output that could not be written or would destroy an input: a folder,
    a FIFO, socket or device, an unknown extension, a folder that cannot be made or written to, or a path that is
    one of the inputs."""
    if path.suffix.lower() not in suffixes:
        raise HdbError(f"{shown(path)} should end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise HdbError(f"{shown(path)} is a folder; give a file name")
    kind = special_kind(path)
    if kind:  # writing would block on it, or replace it with a file
        raise HdbError(f"{shown(path)} is not a regular file ({kind}); give the name of a file to write")
    for source in inputs:
        if source is not None and (path.resolve() == source.resolve() or (path.exists() and path.samefile(source))):
            raise HdbError(f"{shown(path)} is also an input: writing it would destroy the input; choose another name")
    folder = next(parent for parent in path.resolve().parents if parent.exists())  # the part that exists already
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise HdbError(f"Cannot write {shown(path)}: {shown(folder)} is not a folder this user can write to")
    if path.exists() and not os.access(path, os.W_OK):
        raise HdbError(f"Cannot write {shown(path)}: the file is read-only")
    return path


# ----------------------------------------------------------------------------- subcommands


def cmd_tiny_model(args: argparse.Namespace) -> None:
    from hdb.models import save_tiny_pipeline

    out = save_tiny_pipeline(args.out_dir, args.arch, args.seed)
    print(f"tiny {args.arch} pipeline with random weights written to {out}")


def cmd_info(args: argparse.Namespace) -> None:
    from hdb.personal_file import describe

    print(describe(args.file))


def cmd_export(args: argparse.Namespace) -> None:
    from hdb.devices import DTYPES
    from hdb.export import export_lora
    from hdb.hub import check_repo_id, push_lora
    from hdb.personal_file import load_personal

    check_output(args.output, (".safetensors",), [args.file])
    if args.picture and not args.push:
        raise HdbError("--picture goes with --push: the pictures are shown by the model card on the Hub")
    if args.push:
        check_repo_id(args.push)
    weights = load_personal(args.file)
    path = export_lora(weights, args.output, args.format, DTYPES[args.dtype])
    print(f"{args.format} LoRA written to {shown(path)} ({path.stat().st_size:,} bytes)")
    if args.push:
        upload = push_lora(path, weights, args.push, private=args.private, pictures=dict(args.picture or []))
        _report(upload, f"{shown(path)} with its model card")


def cmd_personalize(args: argparse.Namespace) -> None:
    from hdb.devices import DTYPES
    from hdb.faces import load_image
    from hdb.pipeline import PersonalPipeline, check_photo_count, check_steps

    check_photo_count(len(args.photo))
    check_steps(args.steps, has_start=args.hypernet is not None)
    check_output(args.output, (".safetensors",), args.photo)
    if args.save_face:
        check_output(args.save_face, IMAGE_SUFFIXES, [*args.photo, args.output])
    for photo in args.photo:  # a missing, unreadable or endless (FIFO) photo fails before the model loads
        check_regular_file(photo)
        load_image(photo)

    _quiet_model_loading()
    lidb = LiDBConfig(layers=args.layers) if args.layers else None
    personal = PersonalPipeline.load(args.base, args.hypernet, args.device, args.dtype, lidb, args.quantize)
    if personal.hypernet is None:
        print("No --hypernet given: finetuning from zero (no prediction to start from), so more steps by default.")
    config = config_from_args(PersonalizeConfig, args)
    faces = personal.faces(args.photo, config.resolution)  # the library's crop for this base
    for photo, face in zip(args.photo, faces, strict=True):
        if face.note:
            print(f"{shown(photo.name)}: {face.note}")
    result = personal.personalize(faces, config)
    for note in result.notes:
        print(f"warning: {note}")
    try:
        path = personal.save(args.output, DTYPES[args.save_dtype])
    except HdbError as error:  # a full disk, say: the finetune is not lost with the file
        raise HdbError(f"{error}. {_kept_elsewhere(personal, DTYPES[args.save_dtype])}") from None
    losses = result.losses
    if losses:
        print(
            f"{result.steps} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f} "
            f"(mean of last 10: {sum(losses[-10:]) / len(losses[-10:]):.4f})"
        )
    else:
        print("0 steps: the hypernetwork's prediction alone, no finetune")
    print(
        f"personal file: {shown(path)} ({path.stat().st_size:,} bytes, rank {result.weights.config.rank}, "
        f"{result.weights.num_numbers:,} numbers)"
    )
    if args.save_face:
        result.face.image.save(args.save_face)


def _kept_elsewhere(personal: PersonalPipeline, dtype: torch.dtype) -> str:
    """After the output could not be written: the person `personal` holds saved to a new file in the system's
    temporary folder instead, and a sentence that says where (or that this failed too, and the person is lost)."""
    spare = None
    try:
        descriptor, spare = tempfile.mkstemp(prefix="hdb-person-", suffix=".safetensors")  # a name no one else has
        os.close(descriptor)
        personal.save(spare, dtype)
    except (OSError, HdbError) as error:
        if spare is not None:
            Path(spare).unlink(missing_ok=True)
        reason = (error.strerror or str(error)) if isinstance(error, OSError) else str(error)
        return f"Keeping it in the temporary folder failed too ({reason}): the trained person is lost"
    return f"The trained person was saved to {shown(spare)} instead"


def cmd_generate(args: argparse.Namespace) -> None:
    from hdb.personal_file import load_personal
    from hdb.styles import check_prompt, expand_prompt, mentions_person

    output = Path(args.output)
    outputs = [output] if args.num_images == 1 else [_numbered(output, k) for k in range(args.num_images)]
    for path in outputs:
        check_output(path, IMAGE_SUFFIXES, [args.person, args.score])
    weights = load_personal(args.person)  # check the file and the prompts before loading a large model
    expand_prompt(args.prompt, weights.instance_token, args.style)
    if args.negative_prompt is not None:
        check_prompt(args.negative_prompt, "negative prompt")
    references = None
    if args.score:
        from hdb.faces import align_face, face_embedding

        check_regular_file(args.score)  # a FIFO would be waited on forever
        references = [face_embedding(align_face(args.score))]  # no face in the photo fails before the model loads
    from hdb.pipeline import PersonalPipeline

    _quiet_model_loading()
    # in the person's own LiDB shape
    personal = PersonalPipeline.load(args.base, None, args.device, args.dtype, weights.config, args.quantize)
    personal.use(weights)
    if not mentions_person(args.prompt, weights.instance_token):
        print(f"note: the prompt does not mention [V] (or '{weights.instance_token}'); the person may not appear")
    images = personal.generate(args.prompt, **asdict(config_from_args(GenerateOptions, args)))
    output.parent.mkdir(parents=True, exist_ok=True)
    for path, image in zip(outputs, images, strict=True):
        image.save(path)
        if references is None:
            print(f"saved {shown(path)}")
            continue
        from hdb.evaluate import identity_score

        similarity = identity_score(references, image)
        score = "no face found" if similarity is None else f"identity {similarity:.2f} to {shown(args.score.name)}"
        print(f"saved {shown(path)} ({score})")


def _numbered(output: Path, index: int) -> Path:
    return output.with_name(f"{output.stem}_{index}{output.suffix}")


def cmd_bench(args: argparse.Namespace) -> None:
    from hdb.bench import main

    _quiet_model_loading()
    record = main(config_from_args(BenchOptions, args))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))


def cmd_bench_training(args: argparse.Namespace) -> None:
    from hdb.bench_training import (
        bench_training,
        format_growth,
        format_step_costs,
        frozen_weights_gb,
        sd15_batch1_tflops,
        step_costs,
    )

    _quiet_model_loading()
    if args.step_costs:
        rows = step_costs(tuple(args.group_sizes), device=args.device, arch=args.arch)
        counted = [row["tflops"] for row in rows if row["group"] == 1 and args.arch == "sd15"]  # the anchor's step
        batch1 = counted[0] if counted else sd15_batch1_tflops()
        print(format_step_costs(rows, batch1, frozen_weights_gb(args.arch)))
    else:
        rows = bench_training(args.identities, resolution=args.resolution)
        print(format_growth(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def cmd_eval(args: argparse.Namespace) -> None:
    from hdb.evaluate import (
        EVAL_PROMPTS,
        Evaluator,
        evaluate,
        find_people,
        find_photos,
        paper_protocol,
        protocol_table,
        read_prompts,
    )

    # pair files and photos, read the prompts, before loading a large model
    people = find_people(args.people) if args.people else None
    photos = find_photos(args.photos) if args.photos else None
    prompts = read_prompts(args.prompts or EVAL_PROMPTS)
    if photos is not None and not args.hypernet:
        raise HdbError("--photos runs the paper's protocol, which compares a trained hypernetwork: give --hypernet")
    from hdb.families import denoiser
    from hdb.generate import resolved_steps
    from hdb.pipeline import PersonalPipeline

    _quiet_model_loading()
    personal = PersonalPipeline.load(args.base, args.hypernet, args.device, args.dtype, quantize=args.quantize)
    device = denoiser(personal.pipe).device
    models = [None if name.lower() == "none" else name for name in (args.clip, args.dino)]
    evaluator = Evaluator(*models, device=device).load()
    count = len(people or photos)
    steps = resolved_steps(personal.pipe, args.steps)
    print(f"evaluating {count} people x {len(prompts)} prompts, {steps} steps, seed {args.seed}")

    def show(sample: dict) -> None:
        scores = "  ".join(
            "no face" if v is None else f"{k} {v:.3f}" for k, v in sample.items() if k not in ("person", "prompt")
        )
        print(f"  {sample['person']}: {sample['prompt']!r}  {scores}")

    if people is not None:
        result = evaluate(personal, people, prompts, evaluator, seed=args.seed, steps=steps, on_sample=show)
        paths = result.save(args.out)
        print(result.table_markdown())
        print(f"written: {', '.join(str(p) for p in paths)}")
        return
    from hdb.hypernet import HyperNetwork

    k1 = HyperNetwork.from_pretrained(args.hypernet_k1, personal.lidb, device) if args.hypernet_k1 else None
    config = PersonalizeConfig(relax=args.relax, seed=args.seed, progress=False)
    results = paper_protocol(
        personal, photos, prompts, evaluator, k1, config, args.dreambooth_steps, args.seed, steps, show
    )
    for number, result in enumerate(results.values(), start=1):  # each method's own table, samples and grid
        result.save(args.out / f"method{number}")
    table = protocol_table(results)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    print(f"written: {args.out}/table.md, and each method's files in {args.out}/method1 ... method{len(results)}")


def _training_photos(args: argparse.Namespace) -> Path | DatasetSource | TrainingData:
    """--images FOLDER, or --dataset with its column options, or (stage 2) --cache FOLDER."""
    if getattr(args, "cache", None) is not None:
        from hdb.cache import TrainingData

        return TrainingData.open(args.cache)
    if args.images is not None:
        return args.images
    return config_from_args(DatasetSource, args)


def cmd_preoptimize(args: argparse.Namespace) -> None:
    from hdb.identities import FAILED_SUFFIX
    from hdb.preoptimize import LOSSES_FILE, preoptimize

    _quiet_model_loading()
    from accelerate import PartialState

    from hdb.models import load_pipeline

    # under `accelerate launch`, one process per device: each loads the base onto its own
    state = PartialState(cpu=args.device == "cpu")
    device = str(state.device) if args.device == "auto" else args.device
    pipe = load_pipeline(args.base, args.dtype, device, args.quantize)
    config = config_from_args(PreoptimizeConfig, args, lidb=LiDBConfig(rank=args.rank, layers=args.layers))
    summary = preoptimize(pipe, _training_photos(args), args.out, config)
    share = f"process {summary['process']} of {summary['processes']}: " if summary["processes"] > 1 else ""
    print(
        f"{share}{summary['identities']} identities: {summary['trained']} pre-optimised now, "
        f"{summary['already_done']} already done; "
        f"photos skipped: {summary['skipped_photos'] or 'none'} -> {args.out}/weights"
    )
    if summary["losses"]:
        print(f"{share}each identity's first and last losses: {args.out}/{LOSSES_FILE} (they should fall)")
    if summary["failed"]:
        print(
            f"{share}training diverged for {len(summary['failed'])} identities ({', '.join(summary['failed'][:5])}"
            f"{', ...' if len(summary['failed']) > 5 else ''}): see {args.out}/weights/<name>{FAILED_SUFFIX}"
        )
    if summary["failed_before"]:
        print(
            f"{share}left out {len(summary['failed_before'])} identities whose training diverged before; "
            "--retry-failed trains them again (with a lower --lr, say)"
        )


def cmd_cache(args: argparse.Namespace) -> None:
    from hdb.cache import build_cache
    from hdb.hypernet import encoder_image_size

    _quiet_model_loading()
    from accelerate import PartialState

    from hdb.models import load_pipeline

    state = PartialState(cpu=args.device == "cpu")  # under `accelerate launch`: shard k on process k % N
    pipe = load_pipeline(args.base, args.dtype, str(state.device) if args.device == "auto" else args.device)
    encoder_size = encoder_image_size(args.image_encoder)
    summary = build_cache(
        pipe, _training_photos(args), args.weights, args.out, encoder_size, args.resolution, shard_size=args.shard_size
    )
    share = f"process {summary['process']} of {summary['processes']}: " if summary["processes"] > 1 else ""
    print(
        f"{share}{len(summary['made'])} of {summary['shards']} shards made now ({summary['aligned']} identities "
        f"aligned and encoded), {summary['already_there']} already there; "
        f"photos skipped: {summary['skipped_photos'] or 'none'} -> {args.out}"
    )
    if state.is_main_process:
        print(f"train on it: python -m hdb train --cache {args.out} --image-encoder {args.image_encoder} ...")


def cmd_train(args: argparse.Namespace) -> None:
    from hdb.train_hypernet import train_hypernetwork

    _quiet_model_loading()
    # --rank is given only to insist on one: by default the LiDB is the pre-optimised weights'
    lidb = LiDBConfig(rank=args.rank) if args.rank else None
    config = config_from_args(HypernetTrainConfig, args, lidb=lidb, decoder=config_from_args(DecoderConfig, args))
    summary = train_hypernetwork(args.base, _training_photos(args), args.out, args.weights, config, args.device)
    if summary["losses"] and summary["main_process"]:
        last = summary["start_step"] + len(summary["losses"]) - 1
        print(
            f"steps {summary['start_step']}..{last} on {summary['processes']} process(es), "
            f"loss {summary['losses'][0]:.4f} -> {summary['losses'][-1]:.4f}; "
            f"held out: {', '.join(summary['held_out'])}; "
            f"photos skipped: {summary['skipped_photos'] or 'none'}; hypernetwork -> {args.out}/hypernet"
        )


def cmd_push(args: argparse.Namespace) -> None:
    from hdb.hub import push_to_hub

    evaluation = args.eval.read_text() if args.eval else None
    upload = push_to_hub(args.hypernet, args.repo_id, evaluation, private=args.private)
    _report(upload, f"{args.hypernet} with its model card")


def _report(upload: Upload, what: str) -> None:
    """An upload's warnings, then where it went."""
    for note in upload.notes:
        print(f"warning: {note}")
    print(f"uploaded {what} to {upload.url}")


def cmd_demo(args: argparse.Namespace) -> None:
    from hdb.app.main import main as serve
    from hdb.app.main import parse_args

    parse_args(args.app_arguments, "hdb demo")  # --help and bad options are answered before gradio and models load
    if importlib.util.find_spec("gradio") is None:
        raise HdbError('The demo needs gradio, which hdb installs as an extra: pip install "hdb[app]"')
    serve(args.app_arguments, "hdb demo")


def cmd_toy(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # the toy command owns its process: this is its own setting
    from hdb.toy.experiment import PAPER_VARIANTS, run_toy

    _quiet_model_loading()
    if args.summarise:
        from hdb.toy.report import summarise_seeds

        print(summarise_seeds(args.summarise))
        return
    folder = "docs/toy/paper_variants" if args.paper_variants else "docs/toy"
    out = args.out or Path(f"{folder}/seed{args.seed}")
    config = PAPER_VARIANTS if args.paper_variants else None  # None: run_toy's, full or --quick
    results = run_toy(out, quick=args.quick, seed=args.seed, config=config, workers=args.workers, resume=args.resume)
    print((out / "results.md").read_text())
    print(
        f"written: {out}/results.json, results.md, losses.png, renders.jpg, samples.jpg "
        f"({results['timings_s']['total']:.0f} s)"
    )


def _add_model_options(parser: argparse.ArgumentParser, quantize: bool = True) -> None:
    """Which base model the command loads, and how (`ModelOptions`); `quantize`: whether it may be quantised."""
    config_options(parser, ModelOptions, leave_out=() if quantize else ("quantize",))


def _add_photo_options(parser: argparse.ArgumentParser, cache: bool = False) -> None:
    """Where training photos come from: a folder, or a Hugging Face dataset; `cache`: or a training cache."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="folder: one photo per identity, or one sub-folder per identity")
    if cache:
        source.add_argument("--cache", type=Path, help="a training cache from `hdb cache` (holds the weights too)")
    config_option(source, DatasetSource, "path")  # --dataset: the one of the two a command requires
    config_options(parser, DatasetSource)  # its split and columns


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The command line: one sub-parser per command, each made by its function in COMMANDS."""
    parser = argparse.ArgumentParser(
        prog="python -m hdb",
        description="HyperDreamBooth: personalise Stable Diffusion, FLUX.1 or SD3.5 from one face photo.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(sub)
    return parser


def _tiny_model_command(sub: argparse._SubParsersAction) -> None:
    tiny = sub.add_parser("tiny-model", help="write a tiny random-weight pipeline (offline tests and demos)")
    tiny.add_argument("out_dir", type=Path)
    config_options(tiny, TinyModelOptions)
    tiny.set_defaults(run=cmd_tiny_model)


def _info_command(sub: argparse._SubParsersAction) -> None:
    info = sub.add_parser("info", help="print what a personal weights file holds")
    info.add_argument("file", type=Path)
    info.set_defaults(run=cmd_info)


def _export_command(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="export a personal file as a standard LoRA (diffusers or kohya keys)")
    export.add_argument("file", type=Path)
    export.add_argument("-o", "--output", type=Path, required=True, help="output .safetensors file")
    config_options(export, ExportOptions, push={"metavar": "REPO_ID"})
    export.add_argument(
        "--picture",
        nargs=2,
        action="append",
        metavar=("IMAGE", "PROMPT"),
        help="with --push: a picture made with the person and its prompt, shown by the card (repeatable)",
    )
    export.set_defaults(run=cmd_export)


def _personalize_command(sub: argparse._SubParsersAction) -> None:
    person = sub.add_parser("personalize", help="personalise from one face photo -> personal weights file")
    person.add_argument("photo", type=Path, nargs="+", help=f"1 to {MAX_PHOTOS} photos of the same person")
    _add_model_options(person)
    person.add_argument("--hypernet", help=f"{HYPERNET_HELP} (optional)")
    person.add_argument("-o", "--output", type=Path, required=True, help="personal .safetensors file to write")
    config_options(person, PersonalizeConfig)
    config_option(person, LiDBConfig, "layers", unset=f"the hypernetwork's, else {LIDB_LAYERS[0]}")
    person.add_argument("--save-dtype", choices=FILE_DTYPES, default=FILE_DTYPES[0])
    person.add_argument("--save-face", type=Path, help="also save the aligned face crop here")
    person.set_defaults(run=cmd_personalize)


def _generate_command(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate pictures of a personalised person")
    _add_model_options(gen)
    gen.add_argument("--person", type=Path, required=True, help="personal weights file")
    gen.add_argument("--prompt", required=True, help="use [V] for the person, e.g. 'a [V] as an astronaut'")
    gen.add_argument("--score", type=Path, help="a photo of the person: print each image's identity similarity to it")
    gen.add_argument("-o", "--output", type=Path, required=True, help="output .png (several images: _0, _1, ...)")
    config_options(gen, GenerateOptions, style={"choices": _style_names()})
    gen.set_defaults(run=cmd_generate)


def _preoptimize_command(sub: argparse._SubParsersAction) -> None:
    pre = sub.add_parser(
        "preoptimize", help="stage 1: pre-optimise a LiDB per identity (resumable; works under `accelerate launch`)"
    )
    _add_photo_options(pre)
    pre.add_argument("--out", type=Path, required=True)
    _add_model_options(pre)
    config_options(pre, PreoptimizeConfig)
    config_option(pre, LiDBConfig, "rank")
    config_option(pre, LiDBConfig, "layers")
    pre.set_defaults(run=cmd_preoptimize)


def _cache_command(sub: argparse._SubParsersAction) -> None:
    cache = sub.add_parser(
        "cache", help="between the stages: stage 2's training data, made once (works under `accelerate launch`)"
    )
    _add_photo_options(cache)
    cache.add_argument("--weights", type=Path, required=True, help="the folder `preoptimize` wrote")
    cache.add_argument("--out", type=Path, required=True, help="the cache folder (shards and index.json)")
    _add_model_options(cache, quantize=False)
    config_option(cache, HypernetTrainConfig, "image_encoder")
    config_option(cache, HypernetTrainConfig, "resolution")
    config_options(cache, CacheOptions)
    cache.set_defaults(run=cmd_cache)


def _train_command(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser("train", help="stage 2: train the hypernetwork (works under `accelerate launch`)")
    _add_photo_options(tr, cache=True)
    tr.add_argument(
        "--weights", type=Path, help="pre-optimised weights from `preoptimize` (needed when --beta > 0, unless --cache)"
    )
    tr.add_argument("--out", type=Path, required=True, help="checkpoints, TensorBoard logs and the final hypernet/")
    config_options(
        tr,
        ModelOptions,
        leave_out=("dtype", "quantize"),
        device={"help": "auto or cpu (several GPUs: accelerate launch)"},
    )
    config_options(tr, HypernetTrainConfig)
    config_options(tr, DecoderConfig)
    config_option(tr, LiDBConfig, "rank", unset="the --weights folder's, else 1")
    tr.set_defaults(run=cmd_train)


def _push_command(sub: argparse._SubParsersAction) -> None:
    push = sub.add_parser("push", help="upload a trained hypernetwork to the Hugging Face Hub, with a model card")
    push.add_argument("hypernet", type=Path, help="the trained hypernetwork directory (OUT/hypernet from `train`)")
    push.add_argument("repo_id", help="owner/name on the hub")
    push.add_argument("--eval", type=Path, help="table.md from `hdb eval`, for the card's evaluation section")
    config_options(push, PushOptions)
    push.set_defaults(run=cmd_push)


def _demo_command(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo",
        add_help=False,  # its options are the app's own: `hdb demo --help` lists them (hdb.app.main.parse_args)
        help='start the Gradio demo (needs the app extra: pip install "hdb[app]"); hdb demo --help: its options',
    )
    demo.set_defaults(run=cmd_demo)


def _toy_command(sub: argparse._SubParsersAction) -> None:
    toy = sub.add_parser(
        "toy", help="small-scale proof that it learns: synthetic faces, all stages, held-out loss table (CPU)"
    )
    toy.add_argument(
        "--out", type=Path, help="results.json, results.md, losses.png, renders.jpg (default docs/toy/seed<SEED>)"
    )
    toy.add_argument(
        "--summarise", type=Path, metavar="DIR", help="only combine DIR/seed*/results.json into DIR/summary.md"
    )
    config_options(toy, ToyOptions)
    toy.set_defaults(run=cmd_toy)


def _bench_command(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="time personalisation against DreamBooth and DreamBooth-LoRA, same run")
    config_options(bench, BenchOptions, compile={"nargs": "?", "const": "full"})
    bench.add_argument("--json", type=Path, help="also write the figures here")
    bench.set_defaults(run=cmd_bench)


def _bench_training_command(sub: argparse._SubParsersAction) -> None:
    setup = sub.add_parser(
        "bench-training",
        help="stage 2's set-up time and peak memory per number of identities (cache or photos); --step-costs: a "
        "training step's operations and FLOPs per group size",
    )
    config_options(setup, BenchTrainingOptions)
    setup.add_argument("--json", type=Path, help="also write the figures here")
    setup.set_defaults(run=cmd_bench_training)


def _eval_command(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "eval",
        help="the paper's evaluation (face similarity, DINO, CLIP-I, CLIP-T): of personal files, or of the paper's "
        "methods personalised from photos",
    )
    _add_model_options(ev)
    people_or_photos = ev.add_mutually_exclusive_group(required=True)
    people_or_photos.add_argument(
        "--people", type=Path, help="directory of NAME.safetensors + NAME.jpg/png reference photos: score these"
    )
    people_or_photos.add_argument(
        "--photos",
        type=Path,
        help="directory of one photo per person (NAME.jpg/png): the paper's protocol, each person personalised by "
        "No Hyper, Only Hyper, k=1 (with --hypernet-k1), the full method and DreamBooth-LoRA (needs --hypernet)",
    )
    ev.add_argument("--hypernet", help=f"{HYPERNET_HELP} (--photos)")
    ev.add_argument("--hypernet-k1", help="a hypernetwork trained with --iterations 1, for the k=1 row (--photos)")
    config_option(ev, EvalOptions, "dreambooth_steps")
    config_option(ev, PersonalizeConfig, "relax")
    ev.add_argument("--prompts", type=Path, help="text file, one prompt per line with [V] (default: hdb's 30)")
    config_option(ev, EvalOptions, "clip")
    config_option(ev, EvalOptions, "dino")
    ev.add_argument("--out", type=Path, default=Path("eval"), help="writes table.md, results.json, grid.jpg here")
    config_option(ev, GenerateOptions, "steps")
    config_option(ev, GenerateOptions, "seed")
    ev.set_defaults(run=cmd_eval)


COMMANDS = (
    _tiny_model_command,
    _info_command,
    _export_command,
    _personalize_command,
    _generate_command,
    _preoptimize_command,
    _cache_command,
    _train_command,
    _push_command,
    _demo_command,
    _toy_command,
    _bench_command,
    _bench_training_command,
    _eval_command,
)  # in the order `--help` lists them


def _style_names() -> list[str]:
    from hdb.styles import STYLE_PRESETS

    return list(STYLE_PRESETS)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = build_parser()
    args, app_arguments = parser.parse_known_args(argv)  # what follows `demo` is the app's to parse
    if args.command != "demo" and app_arguments:
        parser.error(f"unrecognized arguments: {' '.join(app_arguments)}")
    args.app_arguments = app_arguments
    try:
        args.run(args)
    except HdbError as error:
        print(f"error: {shown(cli_terms(str(error)))}", file=sys.stderr)  # settings named as its flags
        return 1
    except OSError as error:  # what no check foresaw (a full disk, a file removed meanwhile): one line too
        where = f": {shown(error.filename)}" if error.filename else ""
        print(f"error: {shown(str(error.strerror or error))}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
