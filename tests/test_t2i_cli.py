"""The text-to-image recipe end to end on tiny random SDXL / SD1.5 folders: ``dmd2lab prepare-t2i`` (image-caption
folders and webdataset shards -> an encoded cache), ``distill-t2i`` (YAML recipe, GAN on the cached pairs, resume,
export) and ``sample-t2i`` (stock diffusers + LCMScheduler), and their errors.

Oracles: the teacher's own VAE and TextConditioner called directly on the same image and caption, diffusers' own
pipeline loader on the exports, file modification times for what a re-run skips, and the shipped configs against the
paper's settings (DESIGN.md).
"""
import io
import json
import os
import tarfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported (conftest.py sets it too)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dmd2lab import cli, t2i, t2i_data, t2i_models as tm  # noqa: E402
from dmd2lab.image_recipe import load_config  # noqa: E402

torch.set_num_threads(1)
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CAPTIONS = ["the cat", "a red dog", "an owl on a tree"]


def dmd2lab(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(code: int, err: str) -> str:
    """The CLI's one-line error (stderr may also hold the model loaders' progress bars before it)."""
    line = err.rstrip("\n").split("\n")[-1]
    assert code == 2 and line.startswith("dmd2lab: error: "), err
    return line


def noise_image(path_or_buffer, height, width, seed, format=None):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path_or_buffer, format=format)


def write_shard(path, captions, seed=0):
    with tarfile.open(path, "w") as tar:
        for i, caption in enumerate(captions):
            buffer = io.BytesIO()
            noise_image(buffer, 36, 40, seed + i, format="JPEG")
            for name, data in ((f"{i:03d}.jpg", buffer.getvalue()), (f"{i:03d}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {kind: tm.save_t2i_parts(tm.tiny_t2i_parts(kind), root / kind) for kind in ("sdxl", "sd15")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A folder with .txt captions and a metadata.jsonl in a subfolder (4 pairs), a tar shard (3 pairs), prompts."""
    root = tmp_path_factory.mktemp("data")
    images = root / "images"
    (images / "more").mkdir(parents=True)
    for i, caption in enumerate(CAPTIONS):
        noise_image(images / f"im{i}.png", 40 + 8 * i, 48, i)
        (images / f"im{i}.txt").write_text(caption + "\n")
    noise_image(images / "more" / "sea.jpg", 32, 32, 9)
    (images / "more" / "metadata.jsonl").write_text(json.dumps({"file_name": "sea.jpg", "text": "of the sea"}) + "\n")
    prompts = root / "prompts.txt"
    prompts.write_text("the cat\n\na red dog\nan owl on a tree\n")
    return {"images": images, "shard": write_shard(root / "shard-000.tar", ["tar cat", "tar dog", "tar owl"]),
            "prompts": prompts, "root": root}


@pytest.fixture(scope="module")
def caches(tmp_path_factory, teachers, data):
    """prepare-t2i once per kind (module-wide: the distillation tests read them)."""
    root = tmp_path_factory.mktemp("caches")
    for kind in ("sdxl", "sd15"):
        t2i_data.prepare_t2i_cache(teachers[kind], data["images"], root / kind, shard_size=3, progress=False)
    return {"sdxl": root / "sdxl", "sd15": root / "sd15"}


def recipe_file(tmp_path, teachers, data, caches, kind="sdxl", **settings):
    values = dict(kind=kind, pretrained=str(teachers[kind]), prompts=str(data["prompts"]), cache=str(caches[kind]),
                  steps=2, batch_size=2, lr=1e-3, lora_lr=1e-2, warmup_steps=0, log_every=1, checkpoint_every=0,
                  progress=False, mixed_precision="no", device="cpu")
    values.update(settings)
    path = tmp_path / f"{kind}.yaml"
    path.write_text("# a tiny recipe\nt2i:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in values.items()))
    return path


# ---------------------------------------------------------------------------------------------- data
def test_pairs_come_from_txt_captions_jsonl_metadata_and_tar_shards(data):
    pairs = t2i_data.list_pairs(data["images"])
    assert [(p.key, p.caption) for p in pairs] == [("im0.png", "the cat"), ("im1.png", "a red dog"),
                                                   ("im2.png", "an owl on a tree"), ("more/sea.jpg", "of the sea")]
    shard = t2i_data.list_pairs(data["shard"])
    assert [p.caption for p in shard] == ["tar cat", "tar dog", "tar owl"] and shard[0].member == "000.jpg"
    both = t2i_data.list_pairs(data["root"])  # a folder holding shards: their pairs join the folder's
    assert [p.caption for p in both] == [p.caption for p in pairs + shard]
    reader = t2i_data.ImageReader()
    assert reader.read(shard[1]) == tarfile.open(data["shard"]).extractfile("001.jpg").read()
    reader.close()


def test_images_are_resized_on_the_short_side_and_center_cropped(tmp_path):
    pixels = np.zeros((32, 96, 3), np.uint8)
    pixels[:, 20:76] = 255  # white around the middle third (the crop), black sides
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    image = t2i_data.load_image(buffer.getvalue(), 16)
    assert image.shape == (3, 16, 16) and image.min() >= -1 and image.max() <= 1
    assert torch.allclose(image, torch.ones_like(image), atol=0.02)  # only the middle is left
    with pytest.raises(ValueError, match="cannot read image bad.png"):
        t2i_data.load_image(b"not an image", 16, "bad.png")


def test_prepare_t2i_caches_the_vae_latents_and_caption_conditions(capsys, teachers, data, tmp_path):
    cache = tmp_path / "cache"
    code, out, _ = dmd2lab(capsys, "prepare-t2i", "--pretrained", teachers["sdxl"], "--data", data["images"],
                           "--out", cache, "--shard-size", 3, "--batch-size", 2, "--device", "cpu")
    assert code == 0 and f"encoded 4 of 4 pairs into {cache}" in out
    index = json.loads((cache / "index.json").read_text())
    assert index["model"] == {"source": str(teachers["sdxl"].resolve()), "kind": "sdxl", "resolution": 32,
                              "latent_shape": [4, 16, 16], "scaling_factor": 0.13025}
    assert [s["pairs"] for s in index["shards"]] == [3, 1] and index["complete"]
    parts = tm.load_t2i_parts(teachers["sdxl"])
    latents, conditions = t2i_data.load_t2i_cache(cache, parts)
    pair = t2i_data.list_pairs(data["images"])[1]
    with torch.no_grad():
        image = t2i_data.load_image(pair.source.read_bytes(), 32)[None]
        expected = parts.vae.encode(image).latent_dist.mean * parts.vae.config.scaling_factor
    assert torch.allclose(latents[1:2], expected, atol=1e-5)
    encoded = t2i.TextConditioner(parts).encode([pair.caption])
    # The cache encoded in batches of 2: equal to this one-caption call up to batch-size rounding.
    assert torch.allclose(conditions["encoder_hidden_states"][1:2], encoded["encoder_hidden_states"], atol=1e-5)
    assert torch.equal(conditions["added_cond_kwargs"]["time_ids"][1], torch.tensor([32.0, 32, 0, 0, 32, 32]))
    assert torch.allclose(conditions["added_cond_kwargs"]["text_embeds"][1:2],
                          encoded["added_cond_kwargs"]["text_embeds"], atol=1e-5)
    assert t2i_data.load_t2i_cache(cache, limit=2)[0].shape == (2, 4, 16, 16)

    first = (cache / "shard-00000.safetensors").stat().st_mtime_ns
    code, out, _ = dmd2lab(capsys, "prepare-t2i", "--pretrained", teachers["sdxl"], "--data", data["images"],
                           "--out", cache, "--shard-size", 3)
    assert code == 0 and "already holds all 4 pairs; nothing to encode" in out
    # An interrupted run (its last shard never written) finishes only what is missing.
    (cache / "shard-00001.safetensors").unlink()
    index["shards"], index["complete"] = index["shards"][:1], False
    (cache / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="unfinished.*run the same"):
        t2i_data.load_t2i_cache(cache)
    code, out, _ = dmd2lab(capsys, "prepare-t2i", "--pretrained", teachers["sdxl"], "--data", data["images"],
                           "--out", cache, "--shard-size", 3)
    assert code == 0 and "encoded 1 of 4 pairs" in out
    assert (cache / "shard-00000.safetensors").stat().st_mtime_ns == first
    assert torch.equal(t2i_data.load_t2i_cache(cache)[0], latents)
    assert not list(cache.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_prepare_t2i_reads_a_webdataset_shard(capsys, teachers, data, tmp_path):
    code, out, _ = dmd2lab(capsys, "prepare-t2i", "--pretrained", teachers["sd15"], "--data", data["shard"],
                           "--out", tmp_path / "cache")
    assert code == 0 and "encoded 3 of 3 pairs" in out
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["model"]["kind"] == "sd15"
    assert t2i_data.cache_captions(tmp_path / "cache") == [("shard-000.tar:000", "tar cat"),
                                                           ("shard-000.tar:001", "tar dog"),
                                                           ("shard-000.tar:002", "tar owl")]
    latents, conditions = t2i_data.load_t2i_cache(tmp_path / "cache")
    assert latents.shape == (3, 4, 16, 16) and set(conditions) == {"encoder_hidden_states"}


def test_prepare_t2i_errors_say_what_to_fix(capsys, teachers, data, caches, tmp_path):
    def error(*args):
        code, _, err = dmd2lab(capsys, "prepare-t2i", "--pretrained", teachers["sdxl"], *args)
        return error_line(code, err)

    out = ["--out", tmp_path / "cache"]
    err = error("--data", tmp_path / "nowhere", *out)
    assert "does not exist" in err and "same-stem captions" in err and "metadata.jsonl" in err and ".tar" in err
    (tmp_path / "empty").mkdir()
    assert "holds no images or .tar shards" in error("--data", tmp_path / "empty", *out)
    uncaptioned = tmp_path / "uncaptioned"
    uncaptioned.mkdir()
    noise_image(uncaptioned / "dog.png", 8, 8, 0)
    err = error("--data", uncaptioned, *out)
    assert "have no caption: dog.png" in err and str(uncaptioned / "dog.txt") in err
    (uncaptioned / "dog.txt").write_text("a dog")
    (uncaptioned / "torn.png").write_bytes(b"\x89PNG not really")
    (uncaptioned / "torn.txt").write_text("a torn file")
    assert "cannot read image torn.png" in error("--data", uncaptioned, *out)
    (uncaptioned / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "x"}\n')
    assert "names gone.png" in error("--data", uncaptioned, *out)
    broken = write_shard(tmp_path / "broken.tar", ["a cat"])
    with tarfile.open(broken, "a") as tar:
        info = tarfile.TarInfo("001.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    assert "without a caption: 001" in error("--data", broken, *out)
    # A cache made with another model or resolution is refused, with the fix.
    err = error("--data", data["images"], "--out", caches["sd15"], "--shard-size", 3)
    assert f"cache {caches['sd15']} was made for {teachers['sd15'].resolve()}" in err
    assert "prepare-t2i --pretrained" in err and "NEW_CACHE" in err
    err = error("--data", data["images"], "--out", caches["sdxl"], "--shard-size", 3, "--resolution", 64)
    assert "resolution differ" in err
    with pytest.raises(ValueError, match="kind, latent_shape differ"):
        t2i_data.load_t2i_cache(caches["sdxl"], tm.tiny_t2i_parts("sd15", latent_size=8))


# ---------------------------------------------------------------------------------------------- recipe
def test_shipped_recipes_hold_the_papers_settings_and_are_strict(data, teachers, caches):
    where = {"prompts": str(data["prompts"])}
    xl = load_config("t2i", CONFIGS / "sdxl.yaml", where)
    assert (xl.kind, xl.student_steps, xl.ratio, xl.guidance, xl.lr, xl.gan_generator_weight,
            xl.gan_discriminator_weight, xl.steps, xl.mixed_precision) == ("sdxl", 4, 5, 8.0, 5e-7, 5e-3, 1e-2, 20000,
                                                                           "bf16")
    assert xl.batch_size * 8 * xl.gradient_accumulation == 128 and xl.fsdp is None  # 8 GPUs: DMD2's batch; FSDP as launched
    sd = load_config("t2i", CONFIGS / "sd15.yaml", where)
    assert (sd.kind, sd.student_steps, sd.conditioning_timestep, sd.ratio, sd.guidance, sd.gan_generator_weight,
            sd.batch_size * 8 * sd.gradient_accumulation) == ("sd15", 1, 999, 10, 1.75, 1e-3, 2048)
    assert sd.t2i_config().prompts == ["the cat", "a red dog", "an owl on a tree"]
    assert load_config("t2i", CONFIGS / "sdxl.yaml", dict(where, image_size=[512, 512])).image_size == (512, 512)
    for overrides, message in [({"guidanse": 8}, r"unknown t2i setting\(s\) \['guidanse'\]; valid: kind, prompts"),
                               ({"ratio": "5"}, "T2IRecipe.ratio must be int"),
                               ({"image_size": [512]}, r"image_size must be a list \[int, int\]"),
                               ({"mixed_precision": False}, "quote it"),
                               ({"prompts": str(data["root"] / "nope.txt")}, "prompt file .*nope.txt does not exist"),
                               ({"cache": None}, "needs real image-caption pairs.*prepare-t2i"),
                               ({"pretrained": ""}, "pretrained must name the teacher"),
                               ({"cache_limit": 0}, "cache_limit must be >= 1")]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            load_config("t2i", CONFIGS / "sdxl.yaml", dict(where, **overrides))
    # A recipe given to the other backend's command says which command runs it.
    with pytest.raises(ValueError, match="text-to-image recipe: run it with `dmd2lab distill-t2i`"):
        load_config("distill", CONFIGS / "sdxl.yaml")
    with pytest.raises(ValueError, match="image recipe: run it with `dmd2lab distill`"):
        load_config("t2i", CONFIGS / "fmnist.yaml", where)
    # No GAN and backward simulation: no real pairs, so no cache needed.
    assert load_config("t2i", None, dict(where, pretrained="x", gan_generator_weight=0,
                                         gan_discriminator_weight=0)).cache is None


def test_the_distillation_carries_the_scale_settings_into_the_training_loop(teachers):
    parts = tm.tiny_t2i_parts("sdxl")
    config = t2i.T2IConfig("sdxl", CAPTIONS, steps=1, batch_size=1, gradient_accumulation=3, fsdp=False,
                           fsdp_min_params=1000, gan_generator_weight=0, gan_discriminator_weight=0)
    loop = t2i.build_t2i_distillation(parts, config).trainer.config
    assert (loop.gradient_accumulation, loop.fsdp, loop.fsdp_min_params) == (3, False, 1000)


def test_distill_t2i_trains_with_the_gan_resumes_exports_and_samples(capsys, teachers, data, caches, tmp_path):
    from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionXLPipeline
    config, run = recipe_file(tmp_path, teachers, data, caches), tmp_path / "run"
    code, out, err = dmd2lab(capsys, "distill-t2i", "--config", config, "--out", run)
    assert code == 0, err
    assert out.strip() == f"wrote {run / 'export'}"
    rows = (run / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert len(rows) == 3 and np.isfinite(float(rows[1].split(",")[header.index("gan_discriminator_loss")]))
    code, out, err = dmd2lab(capsys, "distill-t2i", "--config", config, "--out", run, "--set", "steps=3")
    assert code == 0, err
    assert [r.split(",")[0] for r in (run / "log.csv").read_text().splitlines()[1:]] == ["1", "2", "3"]
    summary = json.loads((run / "run.json").read_text())
    assert summary["steps"] == 3 and summary["complete"] and summary["timesteps"] == [999, 749, 499, 249]
    pipe = DiffusionPipeline.from_pretrained(str(run / "export"))
    assert isinstance(pipe, StableDiffusionXLPipeline) and isinstance(pipe.scheduler, LCMScheduler)

    samples = tmp_path / "samples"
    code, out, err = dmd2lab(capsys, "sample-t2i", "--model", run / "export", "--prompts", data["prompts"],
                             "--out", samples, "--batch-size", 2, "--device", "cpu")
    assert code == 0, err
    assert out.strip() == f"wrote 3 images to {samples}"
    assert sorted(p.name for p in samples.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    assert Image.open(samples / "00002.png").size == (32, 32)
    assert [json.loads(r)["text"] for r in (samples / "metadata.jsonl").read_text().splitlines()] == CAPTIONS
    # Image i's noise is seed + i whatever the batch: one batch of 3 makes the same pictures.
    dmd2lab(capsys, "sample-t2i", "--model", run / "export", "--prompts", data["prompts"], "--out",
            tmp_path / "again", "--batch-size", 3, "--device", "cpu")
    assert np.array_equal(np.asarray(Image.open(samples / "00002.png")),
                          np.asarray(Image.open(tmp_path / "again" / "00002.png")))


def test_distill_t2i_one_step_sd15_lora_exports_both_forms(capsys, teachers, data, caches, tmp_path):
    config = recipe_file(tmp_path, teachers, data, caches, "sd15", steps=1, generator_lora=True, lora_rank=4,
                         cache_limit=2)
    code, out, err = dmd2lab(capsys, "distill-t2i", "--config", config, "--out", tmp_path / "run")
    assert code == 0, err
    assert out.split() == ["wrote", str(tmp_path / "run" / "export"), "wrote", str(tmp_path / "run" / "export_lora")]
    assert (tmp_path / "run" / "export_lora" / "pytorch_lora_weights.safetensors").is_file()
    sampling = json.loads((tmp_path / "run" / "export" / "dmd2lab_sampling.json").read_text())
    assert sampling["timesteps"] == [999] and sampling["guidance_scale"] == 0
    code, out, err = dmd2lab(capsys, "sample-t2i", "--model", tmp_path / "run" / "export", "--prompts",
                             data["prompts"], "--out", tmp_path / "samples", "--steps", 1, "--device", "cpu")
    assert code == 0 and "wrote 3 images" in out, err


def test_a_gathered_student_state_rebuilds_the_students_unet(teachers):
    """The path multi-rank and FSDP runs export through: the whole generator state into a fresh UNet."""
    from dmd2lab import t2i_recipe
    parts = tm.tiny_t2i_parts("sdxl")
    config = t2i.T2IConfig("sdxl", CAPTIONS, steps=1, batch_size=1, student_steps=1, generator_lora=True,
                           lora_rank=4, gan_generator_weight=0, gan_discriminator_weight=0)
    run = t2i.build_t2i_distillation(parts, config)
    with torch.no_grad():
        for p in run.student_unet().parameters():
            p.add_(0.01 * torch.randn_like(p))  # a trained-looking LoRA (B != 0)
    rebuilt = t2i_recipe.unet_from_state(run, run.trainer.full_state("generator"))
    assert tm.is_lora(rebuilt)
    expected = run.student_unet().state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in rebuilt.state_dict().items())


def test_distill_and_sample_errors_name_the_fix(capsys, teachers, data, caches, tmp_path, monkeypatch):
    def error(*args):
        return error_line(*dmd2lab(capsys, *args)[::2])

    run = ["--out", tmp_path / "run"]
    config = recipe_file(tmp_path, teachers, data, caches)
    err = error("distill-t2i", "--config", config, *run, "--set", f"cache={tmp_path / 'no-cache'}")
    assert "index.json is missing" in err and "dmd2lab prepare-t2i --pretrained MODEL" in err
    err = error("distill-t2i", "--config", config, *run, "--set", f"cache={caches['sd15']}")
    assert f"was made for {teachers['sd15'].resolve()} (sd15" in err and "NEW_CACHE" in err
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert "holds no captions" in error("distill-t2i", "--config", config, *run, "--set",
                                       f"prompts={tmp_path / 'blank.txt'}")
    err = error("distill-t2i", "--config", config, *run, "--set", f"pretrained={tmp_path / 'models' / 'sdxl'}",
                "gan_generator_weight=0", "gan_discriminator_weight=0")
    assert "does not exist" in err and "huggingface-cli download" in err
    assert "holds a StableDiffusionPipeline ('sd15'), not 'sdxl'" in error(
        "distill-t2i", "--config", config, *run, "--set", f"pretrained={teachers['sd15']}", "gan_generator_weight=0",
        "gan_discriminator_weight=0")
    assert not (tmp_path / "run").exists()  # every refusal came before training
    assert "no exported student" in error("sample-t2i", "--model", tmp_path, "--prompts", data["prompts"],
                                          "--out", tmp_path / "s")
    assert "no dmd2lab_sampling.json" in error("sample-t2i", "--model", teachers["sdxl"], "--prompts",
                                               data["prompts"], "--out", tmp_path / "s")
    assert "decreasing" in error("sample-t2i", "--model", teachers["sdxl"], "--prompts", data["prompts"],
                                 "--out", tmp_path / "s", "--timesteps", 249, 999)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: ranks would overwrite each other's files
    assert "runs as one process" in error("prepare-t2i", "--pretrained", teachers["sdxl"], "--data", data["images"],
                                          "--out", tmp_path / "c")


def test_captioned_images_are_written_in_the_layout_the_cache_reads(tmp_path):
    from dmd2lab import t2i_data
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    folder = t2i_data.write_captioned_images(images, ["a cat", "a dog", "a bag"], tmp_path / "pairs")
    assert [p.caption for p in t2i_data.list_pairs(folder)] == ["a cat", "a dog", "a bag"]
    with pytest.raises(ValueError, match="one caption per image"):
        t2i_data.write_captioned_images(images, ["a cat"], tmp_path / "x")
