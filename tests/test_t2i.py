"""Text-to-image DMD2 (dmd2lab.t2i, dmd2lab.t2i_models) on tiny random SDXL and SD1.5 built offline.

Oracles: diffusers' own pipelines (their prompt encoding, size/crop ids and LCMScheduler sampling are what a user
runs the exported student with, so our conditioning and conventions must reproduce them), the UNet called directly
in its eps/VP convention, classifier-free guidance recomputed from separate conditional and unconditional calls,
forward hooks that log every generator call of backward simulation, and parameter snapshots around training steps.
"""
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported (conftest.py sets it too)

import pytest  # noqa: E402
import torch  # noqa: E402

from dmd2lab import t2i, t2i_models as tm  # noqa: E402
from dmd2lab.diffusion import NoiseSchedule  # noqa: E402

torch.set_num_threads(1)
PROMPTS = ["the cat", "a red dog", "an owl on a tree", "of the sea"]


def tiny_config(kind="sdxl", **overrides):
    settings = dict(kind=kind, prompts=PROMPTS, steps=2, batch_size=2, lr=1e-3, lora_lr=1e-2, warmup_steps=0,
                    log_every=1, checkpoint_every=0)
    settings.update(overrides)
    return t2i.T2IConfig(**settings)


@pytest.fixture(scope="module")
def sdxl():
    return tm.tiny_t2i_parts("sdxl", seed=0)


@pytest.fixture(scope="module")
def sd15():
    return tm.tiny_t2i_parts("sd15", seed=0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, sdxl, sd15):
    root = tmp_path_factory.mktemp("teachers")
    return {"sdxl": tm.save_t2i_parts(sdxl, root / "sdxl"), "sd15": tm.save_t2i_parts(sd15, root / "sd15")}


def real_pairs(parts, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn((n,) + parts.latent_shape, generator=g)
    return latents, t2i.TextConditioner(parts).encode(PROMPTS[:n])


def build(parts, **overrides):
    return t2i.build_t2i_distillation(parts, tiny_config(parts.kind, **overrides), *real_pairs(parts))


def stock_pipeline(folder):
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------- models
def test_tiny_sdxl_is_wired_like_sdxl(sdxl):
    unet, (e1, e2) = sdxl.unet, sdxl.text_encoders
    assert unet.config.cross_attention_dim == e1.config.hidden_size + e2.config.hidden_size
    assert unet.config.projection_class_embeddings_input_dim == (6 * unet.config.addition_time_embed_dim
                                                                 + e2.config.projection_dim)
    assert sdxl.tokenizers[0].model_max_length == 77 and sdxl.latent_shape == (4, 16, 16)
    assert sdxl.vae_scale_factor == 2 and sum(p.numel() for p in unet.parameters()) < 2_000_000
    assert not any(p.requires_grad for m in (unet, sdxl.vae, e1, e2) for p in m.parameters())


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_prompt_encoding_and_unconditional_input_are_the_pipelines(kind, sdxl, sd15):
    parts = {"sdxl": sdxl, "sd15": sd15}[kind]
    pipe = tm.pipeline_from_parts(parts)
    conditioner = t2i.TextConditioner(parts)
    ours = conditioner.encode(PROMPTS[:2])
    uncond = conditioner.unconditional(ours)
    if kind == "sdxl":
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS[:2], device="cpu",
                                                                       do_classifier_free_guidance=True)
        assert torch.equal(ours["added_cond_kwargs"]["text_embeds"], pooled)
        time_ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32,
                                          text_encoder_projection_dim=parts.text_encoders[1].config.projection_dim)
        assert torch.equal(ours["added_cond_kwargs"]["time_ids"], time_ids.expand(2, 6))
        # DMD2's unconditional input for SDXL: zero embeddings (as SDXL's pipeline for an empty negative prompt).
        assert torch.equal(uncond["added_cond_kwargs"]["text_embeds"], negative_pooled)
        assert torch.equal(uncond["added_cond_kwargs"]["time_ids"], ours["added_cond_kwargs"]["time_ids"])
    else:
        embeds, negative = pipe.encode_prompt(PROMPTS[:2], "cpu", 1, True)
        assert not torch.equal(negative, torch.zeros_like(negative))  # SD1.5: the empty prompt's embeddings
    assert torch.equal(ours["encoder_hidden_states"], embeds)
    assert torch.equal(uncond["encoder_hidden_states"], negative)
    with pytest.raises(TypeError, match="list of prompts"):
        conditioner.encode("the cat")


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_a_saved_tiny_folder_loads_through_the_real_loader(kind, sdxl, sd15, folders):
    parts = {"sdxl": sdxl, "sd15": sd15}[kind]
    loaded = tm.load_t2i_parts(folders[kind])  # kind read from model_index.json
    assert loaded.kind == kind and loaded.source == str(folders[kind])
    assert type(loaded.scheduler) is type(parts.scheduler)  # the folder's own scheduler (Euler / PNDM)
    assert torch.equal(loaded.scheduler.alphas_cumprod, parts.scheduler.alphas_cumprod)
    assert not any(p.requires_grad for p in loaded.unet.parameters())
    x = torch.randn((1,) + parts.latent_shape)
    conditions = t2i.TextConditioner(parts).encode(["the cat"])
    assert all(torch.equal(v, parts.unet.state_dict()[k]) for k, v in loaded.unet.state_dict().items())
    with torch.no_grad():
        out = t2i.TextDenoiser(loaded.unet, loaded.scheduler)(x, 2.0, **conditions)
        expected = t2i.TextDenoiser(parts.unet, parts.scheduler)(x, 2.0, **conditions)
    assert torch.allclose(out, expected, atol=1e-5)
    assert tm.missing_files(folders[kind], kind) == []
    with pytest.raises(ValueError, match="not 'sd15'|not 'sdxl'"):
        tm.load_t2i_parts(folders[kind], kind="sd15" if kind == "sdxl" else "sdxl")


def test_missing_weights_name_every_missing_file_and_how_to_get_them(folders, tmp_path):
    import shutil
    broken = tmp_path / "sdxl"
    shutil.copytree(folders["sdxl"], broken)
    shutil.rmtree(broken / "text_encoder_2")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as error:
        tm.load_t2i_parts(broken)
    message = str(error.value)
    for expected in ("text_encoder_2/model.safetensors", "text_encoder_2/config.json",
                     "unet/diffusion_pytorch_model.safetensors", str(broken),
                     "huggingface-cli download stabilityai/stable-diffusion-xl-base-1.0"):
        assert expected in message
    assert "vae/" not in message.split("A StableDiffusionXLPipeline folder holds")[0]  # only what is missing
    shutil.copy(broken / "text_encoder" / "model.safetensors", broken / "text_encoder" / "model.fp16.safetensors")
    (broken / "text_encoder" / "model.safetensors").unlink()
    assert "text_encoder/model.safetensors (it has model.fp16.safetensors: pass variant='fp16')" in tm.missing_files(
        broken, "sdxl")
    with pytest.raises(FileNotFoundError, match=r"does not exist.*huggingface-cli download"):
        tm.load_t2i_parts(tmp_path / "nowhere" / "sdxl")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        tm.load_t2i_parts(tmp_path)


def test_an_offline_hub_id_fails_at_once_and_says_what_to_put_where():
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError) as error:
        tm.load_t2i_parts("stabilityai/stable-diffusion-xl-base-1.0")
    assert time.perf_counter() - started < 5  # no network retries under HF_HUB_OFFLINE=1
    message = str(error.value)
    assert "not a local folder" in message and "HF_HUB_OFFLINE" in message
    assert "huggingface-cli download stabilityai/stable-diffusion-xl-base-1.0 --local-dir" in message


# ---------------------------------------------------------------------------------------- denoisers
def test_text_denoiser_is_the_unets_eps_prediction_in_the_ve_frame(sdxl):
    teacher = t2i.TextDenoiser(sdxl.unet, sdxl.scheduler)
    conditions = t2i.TextConditioner(sdxl).encode(PROMPTS[:2])
    a = sdxl.scheduler.alphas_cumprod.double()
    t = torch.tensor([249, 749])
    sigma = ((1 - a[t]) / a[t]).sqrt()
    x = torch.randn((2,) + sdxl.latent_shape)
    with torch.no_grad():
        x_vp = (x.double() * a[t].sqrt()[:, None, None, None]).float()
        eps = sdxl.unet(x_vp, t, **conditions).sample.double()
        expected = (x_vp.double() - (1 - a[t]).sqrt()[:, None, None, None] * eps) / a[t].sqrt()[:, None, None, None]
        assert torch.allclose(teacher(x, sigma, **conditions).double(), expected, atol=1e-4)


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_cfg_is_uncond_plus_w_times_the_difference(kind, sdxl, sd15):
    parts = {"sdxl": sdxl, "sd15": sd15}[kind]
    teacher = t2i.TextDenoiser(parts.unet, parts.scheduler)
    conditioner = t2i.TextConditioner(parts)
    cond = conditioner.encode(PROMPTS[:3])
    x, sigma = torch.randn((3,) + parts.latent_shape), torch.tensor([0.5, 3.0, 14.0], dtype=torch.float64)
    w = t2i.PAPER_DEFAULTS[kind]["guidance"]
    with torch.no_grad():
        c = teacher(x, sigma, **cond).double()
        u = teacher(x, sigma, **conditioner.unconditional(cond)).double()
        guided = t2i.guided_teacher(teacher, w, conditioner.unconditional)(x, sigma, **cond).double()
    expected = u + w * (c - u)
    # One batch of 2n vs two of n: float32 rounding differs by ~1e-5, times 1/sqrt(a_t) ~ 14 at sigma 14 and w = 8;
    # a wrong combination would be off by w |c - u| ~ 1 here.
    assert (guided - expected).abs().max() < 1e-3 < (w * (c - u)).abs().max()
    # Guiding eps gives the same x0: eps = (x - x0) / sigma is affine in x0, with one coefficient for both branches.
    s = sigma[:, None, None, None]
    eps_c, eps_u = (x - c) / s, (x - u) / s
    assert torch.allclose(x - s * (eps_u + w * (eps_c - eps_u)), expected, atol=1e-9)
    with torch.no_grad():
        assert torch.equal(t2i.guided_teacher(teacher, 1.0, conditioner.unconditional)(x, sigma, **cond).double(), c)
    with pytest.raises(ValueError, match="guidance must be >= 1"):
        t2i.guided_teacher(teacher, 0.5, conditioner.unconditional)


def test_features_are_the_mid_block_output_and_carry_gradients(sdxl):
    denoiser = t2i.trainable_text_denoiser(t2i.TextDenoiser(sdxl.unet, sdxl.scheduler))
    conditions = t2i.TextConditioner(sdxl).encode(PROMPTS[:2])
    x = torch.randn((2,) + sdxl.latent_shape)
    seen = []
    handle = denoiser.unet.mid_block.register_forward_hook(lambda m, i, o: seen.append(o))
    denoiser(x, 1.0, **conditions)
    handle.remove()
    features = denoiser.features(x, 1.0, **conditions)
    assert features.shape == (2, 64, 8, 8) and torch.allclose(features, seen[0])
    features.sum().backward()
    assert denoiser.unet.down_blocks[0].resnets[0].conv1.weight.grad is not None


def test_lora_critic_trains_only_its_adapters_and_starts_as_the_teacher(sdxl):
    teacher = t2i.TextDenoiser(sdxl.unet, sdxl.scheduler)
    lora = t2i.trainable_text_denoiser(teacher, lora=True)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert all(any(f".{m}." in n for m in t2i.ATTENTION_PROJECTIONS) for n in trainable)
    config = lora.unet.peft_config["default"]
    assert (config.r, config.lora_alpha) == (64, 8)
    assert not any(p.requires_grad for n, p in lora.named_parameters() if "lora_" not in n)
    assert tm.is_lora(lora.unet) and not tm.is_lora(teacher.unet)
    conditions = t2i.TextConditioner(sdxl).encode(PROMPTS[:1])
    x = torch.randn((1,) + sdxl.latent_shape)
    with torch.no_grad():
        assert torch.equal(lora(x, 2.0, **conditions), teacher(x, 2.0, **conditions))  # B = 0 at the start
    assert teacher.log_sigmas.dtype == lora.log_sigmas.dtype == torch.float64


# ------------------------------------------------------------------------------------------- recipe
def test_config_takes_the_papers_settings_per_kind_and_checks_its_inputs(sdxl):
    xl, sd = t2i.T2IConfig("sdxl", PROMPTS), t2i.T2IConfig("sd15", PROMPTS)
    assert (xl.lr, xl.ratio, xl.guidance, xl.gan_generator_weight, xl.gan_discriminator_weight, xl.student_steps,
            xl.critic_lr) == (5e-7, 5, 8.0, 5e-3, 1e-2, 4, 5e-7)
    assert (sd.ratio, sd.guidance, sd.gan_generator_weight, sd.student_steps) == (10, 1.75, 1e-3, 1)
    assert t2i.T2IConfig("sdxl", PROMPTS, critic_lora=True).critic_lr == 5e-5
    assert t2i.student_timesteps(4) == (999, 749, 499, 249) and t2i.student_timesteps(1) == (999,)
    with pytest.raises(ValueError, match="prompts"):
        t2i.T2IConfig("sdxl", [])
    with pytest.raises(ValueError, match="unknown kind"):
        t2i.T2IConfig("sd3", PROMPTS)
    with pytest.raises(ValueError, match="needs real pairs"):
        t2i.build_t2i_distillation(sdxl, tiny_config())
    latents, conditions = real_pairs(sdxl)
    with pytest.raises(ValueError, match="must match the teacher"):
        t2i.build_t2i_distillation(sdxl, tiny_config(), latents, {"encoder_hidden_states":
                                                                  conditions["encoder_hidden_states"]})
    with pytest.raises(ValueError, match="one row per latent"):
        t2i.pair_sampler(latents, t2i.select_conditions(conditions, torch.tensor([0, 1])))


def test_pair_sampler_keeps_latents_with_their_own_conditions(sdxl):
    latents, conditions = real_pairs(sdxl)
    x, c = t2i.pair_sampler(latents, conditions)(6, torch.Generator().manual_seed(0))
    for i in range(6):
        j = next(j for j in range(4) if torch.equal(latents[j], x[i]))
        assert torch.equal(c["added_cond_kwargs"]["text_embeds"][i], conditions["added_cond_kwargs"]["text_embeds"][j])
        assert torch.equal(c["encoder_hidden_states"][i], conditions["encoder_hidden_states"][j])


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(before, module):
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


@pytest.mark.parametrize("critic_lora", [False, True], ids=["full-critic", "lora-critic"])
def test_one_dmd2_step_on_tiny_sdxl_trains_every_loss(sdxl, critic_lora):
    run = build(sdxl, critic_lora=critic_lora)
    teacher_before = _snapshot(sdxl.unet)
    generator_before, critic_before = _snapshot(run.generator), _snapshot(run.critic)
    history = run.trainer.fit()
    first = history[0]
    for name in ("dm_loss", "gan_generator_loss", "critic_loss", "gan_discriminator_loss"):
        assert torch.isfinite(torch.tensor(first[name])), name
    assert history[1]["critic_loss"] > 0 and "dm_loss" not in history[1]  # TTUR: the generator rests at step 1
    assert _changed(generator_before, run.generator)
    changed = _changed(critic_before, run.critic)
    assert any(n.startswith("head.") for n in changed)
    body = {n for n in changed if n.startswith("critic.")}
    assert body
    if critic_lora:
        assert all("lora_" in n for n in body)
    assert not _changed(teacher_before, sdxl.unet)


def test_lora_student_trains_its_adapters_only(sdxl):
    run = build(sdxl, generator_lora=True, steps=1)
    before = _snapshot(run.generator)
    run.trainer.fit()
    changed = _changed(before, run.generator)
    assert changed and all("lora_" in n for n in changed)


def test_a_lora_run_checkpoints_and_resumes(sdxl, tmp_path):
    latents, conditions = real_pairs(sdxl)
    config = dict(critic_lora=True, generator_lora=True, checkpoint_every=1)
    first = t2i.build_t2i_distillation(sdxl, tiny_config(steps=1, **config), latents, conditions, tmp_path)
    first.trainer.fit()
    resumed = t2i.build_t2i_distillation(sdxl, tiny_config(steps=2, **config), latents, conditions, tmp_path)
    resumed.trainer.load(tmp_path / "checkpoints" / "step-00000001")
    for name in ("generator", "critic"):
        saved, loaded = first.trainer.players[name].module, resumed.trainer.players[name].module
        assert all(torch.equal(p, loaded.state_dict()[n]) for n, p in saved.state_dict().items())
    resumed.trainer.fit()
    assert resumed.trainer.step == 2 and [row["step"] for row in resumed.trainer.history] == [1, 2]


def test_backward_simulation_runs_the_prefix_without_grad_in_the_student_timestep_order(sdxl):
    run = build(sdxl)
    calls = []

    def record(module, args, kwargs):
        sample, timestep = args[0], args[1]
        calls.append((round(float(timestep.reshape(-1)[0])), torch.is_grad_enabled(), sample.requires_grad,
                      sample.grad_fn is None))
    handle = run.generator.unet.register_forward_pre_hook(record, with_kwargs=True)
    seen_k = set()
    try:
        for seed in range(12):
            calls.clear()
            run.objective.prepare(0, ["generator", "critic"], torch.Generator().manual_seed(seed))
            k = len(calls) - 1
            seen_k.add(k)
            assert [c[0] for c in calls] == [999, 749, 499, 249][:k + 1]
            assert all(not grad for _, grad, _, _ in calls[:-1])  # the simulated prefix: no grad
            _, grad, input_requires_grad, input_is_leaf = calls[-1]
            assert grad and not input_requires_grad and input_is_leaf  # only the last call has grad, on a plain input
    finally:
        handle.remove()
    assert seen_k == {0, 1, 2, 3}


# ------------------------------------------------------------------------------------------- export
def test_exported_4_step_sdxl_samples_through_stock_diffusers(sdxl, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline
    run = build(sdxl, steps=1)
    run.trainer.fit()
    folder = run.export(tmp_path / "student")
    pipe = stock_pipeline(folder)
    assert isinstance(pipe, StableDiffusionXLPipeline) and isinstance(pipe.scheduler, LCMScheduler)
    student = run.student_unet()
    assert all(torch.equal(p, student.state_dict()[n]) for n, p in pipe.unet.state_dict().items())
    images = pipe("the cat", timesteps=[999, 749, 499, 249], guidance_scale=0, height=32, width=32,
                  output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    pipe.scheduler.set_timesteps(4)  # original_inference_steps=4: the default schedule is the training one
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]
    assert json.loads((folder / "dmd2lab_sampling.json").read_text())["timesteps"] == [999, 749, 499, 249]


def test_stock_lcm_sampling_of_the_export_is_the_students_own_k_step_sampler(sdxl, tmp_path, monkeypatch):
    """Oracle: DMD2's inference (Sec. 4.5: predict x0, re-noise it to the next timestep with fresh noise), written out
    in the VE frame, x <- x0 + sigma_next * noise, with the noise stock LCMScheduler draws, recorded. Given the same
    first input (z sqrt(1 + sigma_999^2), the VP input z) the two agree to float round-off."""
    import diffusers.schedulers.scheduling_lcm as lcm
    run = build(sdxl, steps=1)
    run.trainer.fit()
    pipe = stock_pipeline(run.export(tmp_path / "student"))
    drawn, draw = [], lcm.randn_tensor
    monkeypatch.setattr(lcm, "randn_tensor", lambda *a, **k: drawn.append(draw(*a, **k)) or drawn[-1])
    z = torch.randn((1,) + sdxl.latent_shape, generator=torch.Generator().manual_seed(3))
    stock = pipe("the cat", timesteps=list(run.timesteps), guidance_scale=0, height=32, width=32, latents=z.clone(),
                 output_type="latent", generator=torch.Generator().manual_seed(5)).images
    sigmas = [float(run.schedule.sigmas[t]) for t in run.timesteps]
    conditions, student = run.conditioner.encode(["the cat"]), run.trainer.module("generator")
    x = z * (1 + sigmas[0] ** 2) ** 0.5
    with torch.no_grad():
        for k, sigma in enumerate(sigmas):
            x0 = student(x, torch.full((1,), sigma), **conditions)
            if k + 1 < len(sigmas):
                x = x0 + sigmas[k + 1] * drawn[k]
    assert len(drawn) == len(sigmas) - 1
    assert (x0 - stock).abs().max() < 1e-4


def test_exported_lora_loads_into_the_teachers_pipeline_and_merges_into_a_full_export(sdxl, folders, tmp_path):
    run = build(sdxl, generator_lora=True, steps=1)
    run.trainer.fit()
    student = run.student_unet()
    x = torch.randn((1,) + sdxl.latent_shape)
    conditions = t2i.TextConditioner(sdxl).encode(["the cat"])
    with torch.no_grad():
        expected = student(x, 500, **conditions).sample
    pipe = stock_pipeline(folders["sdxl"])
    pipe.load_lora_weights(str(run.export_lora(tmp_path / "lora")))
    with torch.no_grad():
        assert torch.allclose(pipe.unet(x, 500, **conditions).sample, expected, atol=1e-5)
        merged = stock_pipeline(run.export(tmp_path / "full")).unet
        assert not tm.is_lora(merged)
        assert torch.allclose(merged(x, 500, **conditions).sample, expected, atol=1e-5)
    from diffusers import LCMScheduler
    pipe.scheduler = tm.lcm_scheduler(pipe.scheduler, run.timesteps)
    assert isinstance(pipe.scheduler, LCMScheduler)
    images = pipe("the cat", timesteps=list(run.timesteps), guidance_scale=0, height=32, width=32,
                  output_type="pt").images
    assert torch.isfinite(images).all()
    with pytest.raises(ValueError, match="no LoRA adapters"):
        tm.export_lora(sdxl.unet, tmp_path / "nope", "sdxl")


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_a_one_step_export_is_exactly_our_generator_in_stock_diffusers(kind, sdxl, sd15, tmp_path):
    parts = {"sdxl": sdxl, "sd15": sd15}[kind]
    run = build(parts, student_steps=1, steps=1)
    assert run.timesteps == ((399,) if kind == "sdxl" else (999,))
    run.trainer.fit()
    pipe = stock_pipeline(run.export(tmp_path / "student"))
    z = torch.randn((1,) + parts.latent_shape, generator=torch.Generator().manual_seed(3))
    latents = pipe("the cat", timesteps=list(run.timesteps), guidance_scale=0, height=32, width=32,
                   latents=z.clone(), output_type="latent").images
    with torch.no_grad():
        ours = run.generator(z, **run.conditioner.encode(["the cat"]))
    # LCM's boundary term c_skip ~ 1e-8 at t >= 399: the stock sampler is our G(z) = D(z sqrt(1 + s^2), s).
    assert torch.allclose(latents, ours, atol=1e-4)
    images = pipe("a red dog", timesteps=list(run.timesteps), guidance_scale=0, height=32, width=32,
                  output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_one_dmd2_step_on_tiny_sd15(sd15):
    run = build(sd15)
    assert run.objective.settings.student_sigmas is None and run.trainer.players["generator"].every == 10
    before = _snapshot(run.generator)
    history = run.trainer.fit()
    assert all(torch.isfinite(torch.tensor(v)) for v in history[0].values())
    assert _changed(before, run.generator)
    assert run.sample_latents(["the cat"]).shape == (1,) + sd15.latent_shape


def test_student_latents_follow_the_k_step_schedule(sdxl):
    run = build(sdxl)
    calls = []
    handle = run.generator.unet.register_forward_pre_hook(
        lambda m, args: calls.append(round(float(args[1].reshape(-1)[0]))))
    try:
        latents = run.sample_latents(["the cat", "a red dog"], seed=1)
    finally:
        handle.remove()
    assert calls == [999, 749, 499, 249] and latents.shape == (2,) + sdxl.latent_shape
    assert torch.equal(latents, run.sample_latents(["the cat", "a red dog"], seed=1))
    schedule = NoiseSchedule.from_diffusers(sdxl.scheduler)
    assert run.objective.settings.student_sigmas == tuple(float(schedule.sigmas[t]) for t in (999, 749, 499, 249))


# ------------------------------------------------------------------------------ first update, warm start
def test_the_first_dm_update_on_a_guided_teacher_is_exactly_cfg_augmentation(sdxl):
    first = t2i.first_dm_update(build(sdxl), PROMPTS, sigma=2.0, seed=3)
    assert first["relative_error"] < 1e-5 and first["update_abs_mean"] > 1e-3


def test_the_regression_warm_start_fits_the_one_step_generator_to_teacher_ode_pairs(sdxl):
    run = build(sdxl, student_steps=1, gan_generator_weight=0, gan_discriminator_weight=0)
    z, y, conditions = pairs = t2i.teacher_ode_pairs(run.real, run.conditioner, PROMPTS, sdxl.latent_shape,
                                                     run.schedule, 8, num_steps=3, seed=0, batch_size=4)
    assert y.shape == z.shape and torch.isfinite(y).all()
    assert t2i.select_conditions(conditions, torch.tensor([4]))["encoder_hidden_states"].equal(
        run.conditioner.encode([PROMPTS[0]])["encoder_hidden_states"])  # prompts in turn: pair 4 is prompt 0's

    def regression_error():
        with torch.no_grad():
            return float(((run.generator(z, **conditions) - y) ** 2).mean())
    before = regression_error()
    log = t2i.regression_warm_start(run.generator, pairs, steps=30, lr=1e-3, batch_size=8)
    assert log[-1]["regression_loss"] < log[0]["regression_loss"] and regression_error() < 0.8 * before
    with pytest.raises(ValueError, match="one-step generator"):
        t2i.regression_warm_start(build(sdxl).generator, pairs, steps=1)


def test_a_one_step_recipe_with_a_warm_start_runs_it_before_distilling_and_not_on_resume(sdxl, tmp_path):
    settings = dict(student_steps=1, warm_start_pairs=4, warm_start_steps=3, warm_start_ode_steps=2, lr=1e-3,
                    checkpoint_every=1)
    run = t2i.build_t2i_distillation(sdxl, tiny_config(**settings), *real_pairs(sdxl), out_dir=tmp_path)
    assert [row["step"] for row in run.warm_start_log] == [1, 2, 3]
    run.trainer.fit()
    resumed = t2i.build_t2i_distillation(sdxl, tiny_config(**settings, steps=3), *real_pairs(sdxl), out_dir=tmp_path)
    assert resumed.warm_start_log == []
    with pytest.raises(ValueError, match="one-step generator"):
        tiny_config(warm_start_pairs=4, warm_start_steps=3)


def test_regression_pairs_need_one_row_of_conditions_per_pair():
    from dmd2lab.objective import RegressionObjective
    with pytest.raises(ValueError, match="one row per pair"):
        RegressionObjective(torch.nn.Linear(2, 2), (torch.zeros(4, 2), torch.zeros(4, 2)),
                            conditions={"encoder_hidden_states": torch.zeros(3, 5)})
