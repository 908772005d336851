"""The tiny-base pretraining script, at toy scale: a diffusers folder that loads like SD, reproducible
from its seed, under the size limit, resumable by stage."""

import json
import shutil

import pytest
import torch

from llm4gen.shapes.world import HELD_OUT, parse_prompt
from llm4gen.tools.pretrain import PretrainConfig, make_dataset, pretrain

TOY = dict(num_scenes=48, vae_steps=2, clip_steps=2, unet_steps=2, unet_refine_steps=2, vae_batch=4, clip_batch=8, unet_batch=4,
           log_every=1, eval_prompts=0, threads=1, warmup_steps=1)


def test_training_data_is_training_split_only():
    images, captions = make_dataset(200, 32, seed=0)
    assert images.shape == (200, 3, 32, 32) and images.dtype == torch.uint8
    assert not any((o.color, o.shape) in HELD_OUT for c in captions for o in parse_prompt(c).objects)
    again, same = make_dataset(200, 32, seed=0)
    assert torch.equal(images, again) and captions == same


@pytest.mark.slow
def test_pretrain_writes_a_loadable_base_reproducibly(tmp_path):
    from diffusers import StableDiffusionPipeline

    from llm4gen.encoders.stable_diffusion import load_sd15

    log = pretrain(PretrainConfig(output=str(tmp_path / "a"), **TOY))
    base = tmp_path / "a" / "base"
    assert set(log["stages"]) == {"vae", "clip", "unet", "unet_refine"}
    assert all(len(s["loss_curve"]) == 2 and s["steps"] == 2 for s in log["stages"].values())
    assert log["weights_mb"] <= 25
    assert 0 <= log["stages"]["clip"]["binding_probe_swapped_colours"] <= 1
    loaded = load_sd15(str(base), None, torch.float32, torch.float32)
    assert loaded.unet.config.cross_attention_dim == loaded.text.hidden_size
    # the VAE's scaling factor is measured from its latents, not SD's 0.18215
    assert loaded.vae.config.scaling_factor == pytest.approx(1 / log["stages"]["vae"]["latent_std"], rel=1e-3)
    pipe = StableDiffusionPipeline.from_pretrained(str(base))
    image = pipe("a small red circle", height=32, width=32, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (32, 32, 3)

    # the UNet is stored in fp16 (the size limit) and loaded into fp32
    from safetensors import safe_open
    with safe_open(str(base / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert {p.dtype for p in loaded.unet.parameters()} == {torch.float32}
    a_unet = loaded.unet.state_dict()

    # the same seed gives the same weights
    pretrain(PretrainConfig(output=str(tmp_path / "b"), **TOY))
    for part in ("unet", "vae"):
        a = getattr(loaded, part).state_dict()
        b = getattr(load_sd15(str(tmp_path / "b" / "base"), None, torch.float32, torch.float32), part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)

    # a stage is the same whether the stages before it ran in this process or were reused (each stage
    # seeds its own initialisation): only the VAE and CLIP stages copied, the UNet stages retrained
    (tmp_path / "c" / "stages").mkdir(parents=True)
    for stage in ("vae", "clip"):
        shutil.copytree(tmp_path / "a" / "stages" / stage, tmp_path / "c" / "stages" / stage)
    pretrain(PretrainConfig(output=str(tmp_path / "c"), **TOY))
    unet_c = load_sd15(str(tmp_path / "c" / "base"), None, torch.float32, torch.float32).unet.state_dict()
    assert all(torch.equal(unet_c[k], a_unet[k]) for k in a_unet)

    # run again: finished stages are reused, not retrained; --install-to copies base, log and grid
    before = json.loads((tmp_path / "a" / "pretrain_log.json").read_text())["stages"]
    (tmp_path / "installed").mkdir()
    (tmp_path / "installed" / "stale.txt").write_text("replaced")
    again = pretrain(PretrainConfig(output=str(tmp_path / "a"), install_to=str(tmp_path / "installed"), **TOY))
    assert again["stages"] == before
    installed = tmp_path / "installed"
    assert not (installed / "stale.txt").exists() and (installed / "pretrain_log.json").is_file()
    assert (installed / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (base / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()


@pytest.mark.slow
def test_an_interrupted_unet_stage_resumes_from_its_last_save_to_the_same_weights(tmp_path, monkeypatch):
    import llm4gen.tools.pretrain as pretrain_module
    settings = {**TOY, "unet_steps": 4, "unet_checkpoint_every": 2, "unet_refine_steps": 0}
    pretrain(PretrainConfig(output=str(tmp_path / "straight"), **settings))
    real_record = pretrain_module.StageLog.record

    def interrupt_at_step_3(self, step, loss):
        real_record(self, step, loss)
        if self.name == "unet" and step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_module.StageLog, "record", interrupt_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        pretrain(PretrainConfig(output=str(tmp_path / "resumed"), **settings))
    partial = tmp_path / "resumed" / "stages" / "unet.partial.pt"
    assert torch.load(partial, weights_only=True)["step"] == 2  # plain values: read without trust
    monkeypatch.setattr(pretrain_module.StageLog, "record", real_record)
    pretrain(PretrainConfig(output=str(tmp_path / "resumed"), **settings))
    assert not partial.exists()
    weights = [(tmp_path / run / "base" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
               for run in ("straight", "resumed")]
    assert weights[0] == weights[1]


def test_min_snr_weights_are_one_where_noisy_and_gamma_over_snr_where_clean():
    from diffusers import DDPMScheduler

    from llm4gen.embedded.registry import SD15_SCHEDULER
    from llm4gen.tools.pretrain import min_snr_weights

    alphas = DDPMScheduler.from_config(SD15_SCHEDULER).alphas_cumprod
    t = torch.tensor([0, 100, 500, 999])
    snr = alphas[t] / (1 - alphas[t])
    weights = min_snr_weights(alphas, t, gamma=5.0)
    assert snr[0] > 5 and snr[-1] < 5                                        # both regimes are present
    assert torch.allclose(weights, torch.where(snr > 5, 5 / snr, torch.ones_like(snr)))
    assert weights[-1] == 1.0 and weights[0] < 0.01
    assert torch.equal(min_snr_weights(alphas, t, gamma=None), torch.ones(4))


def test_the_refine_stage_starts_from_the_first_stages_weights(tmp_path):
    """Zero refine steps would return the init itself; one step moves it only a little (a continuation,
    not a fresh UNet)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from llm4gen.embedded.registry import CLIP_TOKENIZER_DIR, SHAPES_UNET, TINY_CLIP
    from llm4gen.tools.pretrain import tokenize, train_unet

    torch.manual_seed(0)
    cfg = PretrainConfig(**{**TOY, "warmup_steps": 1})
    init = UNet2DConditionModel(**{**SHAPES_UNET, "sample_size": 8})
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_CLIP))
    tokenizer = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR))
    ids, empty = tokenize(tokenizer, ["a small red circle"] * 4), tokenize(tokenizer, [""])[0]
    moments = torch.randn(4, 8, 8, 8)
    refined, log = train_unet(moments, ids, empty, text_encoder, 1.0, cfg, torch.Generator().manual_seed(0),
                              name="unet_refine", steps=1, lr=1e-4, snr_gamma=5.0, init=init)
    start, end = init.state_dict(), refined.state_dict()
    assert log["steps"] == 1
    assert max(float((start[k] - end[k]).abs().max()) for k in start) < 0.01
    fresh = UNet2DConditionModel(**{**SHAPES_UNET, "sample_size": 8}).state_dict()
    assert max(float((fresh[k] - end[k]).abs().max()) for k in start) > 0.01


def test_binding_probe_is_chance_for_a_bag_of_words_model_and_perfect_for_a_binding_one():
    """The probe itself: a model that scores captions by the bag of their words scores a caption and its
    swap the same, and a tie is not a preference (0); one that binds colours to shapes reaches 1."""
    from transformers import CLIPTokenizer

    from llm4gen.embedded.registry import CLIP_TOKENIZER_DIR
    from llm4gen.tools.pretrain import binding_probe

    class BagOfWords(torch.nn.Module):
        def forward(self, input_ids, pixel_values):
            counts = torch.zeros(len(input_ids), 49408).scatter_add_(1, input_ids, torch.ones_like(input_ids, dtype=torch.float))
            image_feature = pixel_values.mean((1, 2, 3))                      # (images,)
            text_feature = counts.sum(1)                                      # identical for a caption and its swap
            return type("Out", (), {"logits_per_image": image_feature[:, None] * text_feature[None, :]})()

    tokenizer = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR))
    assert binding_probe(BagOfWords(), tokenizer, 32, n=20) == 0.0

    class Oracle(torch.nn.Module):
        def forward(self, input_ids, pixel_values):
            n = len(pixel_values)
            logits = torch.zeros(n, 2 * n)
            logits[torch.arange(n), torch.arange(n)] = 1.0                   # own captions first, swaps after
            return type("Out", (), {"logits_per_image": logits})()

    assert binding_probe(Oracle(), tokenizer, 32, n=20) == 1.0
