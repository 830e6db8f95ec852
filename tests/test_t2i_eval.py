"""Evaluation of a text-to-image student (dmd2lab.t2i_eval) on tiny random SDXL and CLIP models built offline.

Oracles: diffusers' own pipelines and schedulers (UNet calls logged by a forward hook: timesteps, batch sizes), the
CLIP model's vision/text towers and projections called directly, torchvision's center_crop and PIL's resizers, and
image_metrics.fid_and_kid on the same views in float.
"""
import json
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported (conftest.py sets it too)

import pytest  # noqa: E402
import torch  # noqa: E402

from dmd2lab import t2i_eval as ev, t2i_models as tm  # noqa: E402
from dmd2lab.image_metrics import fid_and_kid  # noqa: E402

torch.set_num_threads(1)
PROMPTS = ["the cat", "a red dog", "an owl on a tree"]


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sdxl():
    return tm.tiny_t2i_parts("sdxl", seed=0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, sdxl):
    root = tmp_path_factory.mktemp("pipelines")
    # The teacher's UNet exported as a student: sampling and timing need the form of an export, not a trained one.
    student = tm.export_pipeline(sdxl.unet, sdxl, root / "student")
    return {"student": student, "teacher": tm.save_t2i_parts(sdxl, root / "teacher")}


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny random CLIP (2-layer towers of width 32, 32 x 32 images in 8 x 8 patches) saved as a transformers
    folder with the toy CLIP tokenizer and a CLIP image processor: the layout of openai/clip-vit-large-patch14."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
    tokenizer = tm.tiny_tokenizer()
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **tower),
        vision_config=dict(image_size=32, patch_size=8, **tower), projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(config)
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def random_images(n, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=g)


# ---------------------------------------------------------------------------------------------- prompts
def test_prompt_files_read_as_text_lines_or_coco_captions_json(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("the cat\n\n  a  red dog \nan owl\n")
    assert ev.read_prompts(text) == ["the cat", "a red dog", "an owl"]
    assert ev.read_prompts(text, limit=2) == ["the cat", "a red dog"]
    coco = tmp_path / "captions_val2014.json"
    coco.write_text(json.dumps({"images": [], "annotations": [
        {"image_id": 1, "id": 7, "caption": "A cat on a mat.\n"}, {"image_id": 2, "id": 8, "caption": "Two dogs"}]}))
    assert ev.read_prompts(coco) == ["A cat on a mat.", "Two dogs"]
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(["one", "two"]))
    assert ev.read_prompts(listed) == ["one", "two"]


def test_prompt_file_errors_name_the_file_and_the_expected_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt.*one caption per line"):
        ev.read_prompts(tmp_path / "nowhere.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="no captions"):
        ev.read_prompts(empty)
    for name, content, message in (("bad.json", "{", "not valid JSON"), ("other.json", '{"images": []}', "annotations"),
                                   ("torn.json", '{"annotations": [{"id": 1}]}', "entry 0 has no caption"),
                                   ("none.json", '{"annotations": []}', "no captions")):
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=message):
            ev.read_prompts(tmp_path / name)
    with pytest.raises(ValueError, match="limit"):
        ev.read_prompts(_write(tmp_path / "one.txt", "the cat\n"), limit=0)


def _write(path, text):
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------- generation
def _record_unet(pipe):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda m, args: calls.append((round(float(args[1].reshape(-1)[0])), args[0].shape[0])))
    return calls, handle


def test_a_student_folder_samples_with_lcm_at_its_timesteps_without_guidance(folders, tmp_path):
    pipe = ev.load_pipeline(folders["student"])
    calls, handle = _record_unet(pipe)
    try:
        out = ev.generate_images(pipe, PROMPTS, seed=3, batch_size=2, out_dir=tmp_path / "images",
                                 warmup_batches=0)
    finally:
        handle.remove()
    assert out.images.shape == (3, 3, 32, 32) and out.images.dtype == torch.uint8
    assert out.arguments == {"timesteps": [999, 749, 499, 249], "guidance_scale": 0.0}
    # Two batches (2 + 1 prompts), four LCM steps each, no CFG doubling of the batch.
    assert calls == [(t, 2) for t in (999, 749, 499, 249)] + [(t, 1) for t in (999, 749, 499, 249)]
    assert out.speed["num_images"] == 3 and out.speed["images_per_s"] > 0
    # PNGs and prompts.txt round-trip.
    assert [p.name for p in out.paths] == ["00000.png", "00001.png", "00002.png"]
    assert ev.read_prompts(tmp_path / "images" / "prompts.txt") == PROMPTS
    folder = ev.ImageFolder(tmp_path / "images")
    assert len(folder) == 3 and all(torch.equal(folder[i], out.images[i]) for i in range(3))
    # One generator per image: the images do not depend on the batch size (float batching noise aside).
    again = ev.generate_images(pipe, PROMPTS, seed=3, batch_size=3, warmup_batches=1)
    assert (again.images.int() - out.images.int()).abs().max() <= 1
    other_seed = ev.generate_images(pipe, PROMPTS[:1], seed=4, batch_size=1, warmup_batches=0)
    assert not torch.equal(other_seed.images[0], out.images[0])


def test_a_folder_path_reads_the_students_saved_timesteps(folders, tmp_path):
    import shutil
    one_step = tmp_path / "one_step"
    shutil.copytree(folders["student"], one_step)
    (one_step / "dmd2lab_sampling.json").write_text(json.dumps({"timesteps": [399], "guidance_scale": 0.0}))
    out = ev.generate_images(one_step, PROMPTS[:2], batch_size=2, warmup_batches=0)
    assert out.arguments["timesteps"] == [399] and out.images.shape == (2, 3, 32, 32)
    # A pipeline loaded from the folder remembers it (diffusers' _name_or_path), and so its timesteps.
    assert ev.sampling_arguments(ev.load_pipeline(one_step))["timesteps"] == [399]


def test_a_teacher_folder_samples_with_its_own_scheduler_steps_and_guidance(folders):
    from diffusers import EulerDiscreteScheduler
    pipe = ev.load_pipeline(folders["teacher"])
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler) and not ev.is_student(pipe, folders["teacher"])
    assert ev.sampling_arguments(pipe, folders["teacher"]) == {"num_inference_steps": 50, "guidance_scale": 8.0}
    calls, handle = _record_unet(pipe)
    try:
        out = ev.generate_images(pipe, PROMPTS[:2], num_inference_steps=2, guidance_scale=8.0, batch_size=2,
                                 warmup_batches=0)
    finally:
        handle.remove()
    assert out.images.shape == (2, 3, 32, 32) and out.images.dtype == torch.uint8
    # Euler's 2-step "leading" schedule, each UNet call on the batch doubled for classifier-free guidance.
    pipe.scheduler.set_timesteps(2)
    assert calls == [(round(float(t)), 4) for t in pipe.scheduler.timesteps]
    with pytest.raises(ValueError, match="num_inference_steps"):
        ev.sampling_arguments(pipe, timesteps=[999])


def test_missing_pipeline_folders_and_bad_arguments_fail_clearly(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*huggingface-cli download"):
        ev.generate_images(tmp_path / "no_student", PROMPTS)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        ev.generate_images(ev.load_pipeline(folders["student"]), [])
    with pytest.raises(ValueError, match="timesteps="):
        ev.sampling_arguments(ev.load_pipeline(folders["student"]), folders["student"], num_inference_steps=4)


# ------------------------------------------------------------------------------------------------- crops
@pytest.mark.parametrize("shape", [(1024, 1024), (480, 640), (427, 640), (300, 301), (299, 299)])
def test_center_crop_is_torchvisions_and_dmd2s_patch_is_the_central_299(shape):
    from torchvision.transforms.functional import center_crop
    image = random_images(1, *shape)[0]
    assert torch.equal(ev.center_crop(image, 299), center_crop(image, [299, 299]))
    view, resized = ev.patch_view(image)
    top, left = ev.center_crop_box(*shape, 299)
    assert not resized and view.shape == (3, 299, 299)
    assert torch.equal(view, image[:, top:top + 299, left:left + 299])  # full resolution: no resampling
    assert top + 299 <= shape[0] and left + 299 <= shape[1]


def test_crop_box_positions_and_small_images():
    assert ev.center_crop_box(1024, 1024, 299) == (362, 362)  # round(725 / 2), rows 362..660
    assert ev.center_crop_box(480, 640, 299) == (90, 170)
    assert ev.center_crop_box(300, 300, 299) == (0, 0)  # round(0.5) = 0, torchvision's rule
    with pytest.raises(ValueError, match="does not fit"):
        ev.center_crop_box(200, 640, 299)
    view, resized = ev.patch_view(random_images(1, 200, 640)[0])
    assert resized and view.shape == (3, 299, 299)


def test_fid_view_is_a_square_center_crop_lanczos_to_eval_res_then_bicubic_to_299():
    import numpy as np
    from PIL import Image
    image = random_images(1, 300, 400)[0]
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    expected = pil.crop((50, 0, 350, 300)).resize((256, 256), Image.LANCZOS).resize((299, 299), Image.BICUBIC)
    view = ev.fid_view(image, eval_res=256)
    assert view.dtype == torch.uint8 and torch.equal(view, torch.from_numpy(np.array(expected)).permute(2, 0, 1))
    grey = random_images(1, 64, 64)[0][:1]
    assert torch.equal(ev.fid_view(grey, None), ev.fid_view(grey.expand(3, -1, -1), None))
    with pytest.raises(ValueError, match="uint8"):
        ev.fid_view(image.float())


# --------------------------------------------------------------------------------------------------- FID
class PixelFeatures(torch.nn.Module):
    """A stand-in for the Inception (64 raw pixels of the [-1, 1] input), to test the plumbing in milliseconds."""

    num_features = 64

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, images):
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 299, 299)
        return images[:, :, 100:108, 100:108].flatten(1) + self.anchor


def test_patch_fid_is_fid_on_the_center_crops_and_warns_when_an_image_is_too_small():
    real, fake = random_images(3, 320, 400, seed=1), random_images(3, 320, 320, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when every image holds a 299 patch
        scores = ev.patch_fid(real, fake, PixelFeatures())
    crops = [torch.stack([ev.center_crop(x, 299) for x in images]).float() / 127.5 - 1 for images in (real, fake)]
    assert scores["fid"] == pytest.approx(fid_and_kid(*crops, PixelFeatures())["fid"], rel=1e-6)
    with pytest.warns(UserWarning, match="1 image.*smaller than 299 x 299.*resized whole"):
        ev.patch_fid(real, [fake[0], random_images(1, 200, 640)[0]], PixelFeatures())
    # Identical sets: 0 up to the round-off of torchmetrics' matrix square root.
    assert ev.fid(real, real, PixelFeatures())["fid"] == pytest.approx(0, abs=1e-3)


def test_fid_through_the_offline_inception_is_fid_and_kid_on_the_views(inception):
    real = [random_images(1, 320, 400, seed=1)[0], random_images(1, 360, 300, seed=2)[0]]
    fake = random_images(2, 320, 320, seed=4) // 2  # darker: a different distribution
    scores = ev.fid(real, fake, inception, eval_res=256)
    # The uint8 path equals fid_and_kid on the same views in the Inception's float range (a lossless conversion).
    views = [torch.stack([ev.fid_view(x, 256) for x in images]).float() / 127.5 - 1 for images in (real, fake)]
    expected = fid_and_kid(*views, inception)
    assert scores["fid"] == pytest.approx(expected["fid"], rel=1e-6) and scores["fid"] > 0
    with pytest.raises(ValueError, match="at least 2"):
        ev.fid(real[:1], fake, inception)


# --------------------------------------------------------------------------------------------- CLIP score
def direct_similarities(model, processor, images, prompts):
    """Cosine similarities through the towers and projections called by hand (the processor prepares inputs)."""
    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
    text = processor(text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        words = model.text_projection(model.text_model(input_ids=text["input_ids"],
                                                       attention_mask=text["attention_mask"]).pooler_output)
    image, words = image.double(), words.double()
    return (image * words).sum(-1) / (image.norm(dim=-1) * words.norm(dim=-1))


def test_clip_score_is_100_times_the_mean_cosine_of_the_models_embeddings(clip_folder):
    model, processor = ev.load_clip(clip_folder)
    images, prompts = random_images(5, 40, 48, seed=5), ["the cat", "a dog", "of the sea", "an owl", "cat and dog"]
    cosines = direct_similarities(model, processor, images, prompts)
    ours = ev.clip_similarities(images, prompts, clip_folder, batch_size=2)  # from the folder, in 3 batches
    assert torch.allclose(ours, cosines, atol=1e-6)
    assert ev.clip_score(images, prompts, (model, processor)) == pytest.approx(max(100 * cosines.mean().item(), 0),
                                                                               abs=1e-4)
    prefixed = ev.clip_similarities(images, prompts, (model, processor), prefix=ev.DMD2_CLIP_PREFIX)
    assert torch.allclose(prefixed, direct_similarities(model, processor, images,
                                                        [ev.DMD2_CLIP_PREFIX + p for p in prompts]), atol=1e-6)
    # Flipping the image embeddings flips every cosine: one of the two scores is clipped to 0, the other is |mean|.
    flipped = ev.load_clip(clip_folder)[0]
    flipped.visual_projection.weight.data.neg_()
    scores = sorted([ev.clip_score(images, prompts, (model, processor)),
                     ev.clip_score(images, prompts, (flipped, processor))])
    assert scores[0] == 0 and scores[1] == pytest.approx(100 * abs(cosines.mean().item()), abs=1e-4)
    with pytest.raises(ValueError, match="5 images and 4 prompts"):
        ev.clip_score(images, prompts[:4], (model, processor))


def test_an_absent_clip_folder_fails_at_once_and_says_what_to_put_there(clip_folder, tmp_path):
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError) as error:
        ev.clip_score(random_images(1, 32, 32), ["the cat"], tmp_path / "clip-vit-large-patch14")
    assert time.perf_counter() - started < 5  # nothing reaches for the network
    message = str(error.value)
    assert str(tmp_path / "clip-vit-large-patch14") in message
    assert "huggingface-cli download openai/clip-vit-large-patch14 --local-dir" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ev.load_clip("openai/clip-vit-large-patch14")  # a hub id is not a local folder: no download
    import shutil
    torn = tmp_path / "torn"
    shutil.copytree(clip_folder, torn)
    (torn / "model.safetensors").unlink()
    (torn / "processor_config.json").unlink()
    assert ev.clip_missing_files(torn) == ["model.safetensors", "preprocessor_config.json"]
    with pytest.raises(FileNotFoundError, match="lacks model.safetensors, preprocessor_config.json"):
        ev.load_clip(torn)
