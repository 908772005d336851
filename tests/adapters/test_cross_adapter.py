import pytest
import torch
from torch import nn

from llm4gen.adapters.cross_adapter import (
    CrossAdapter,
    convert_released_state_dict,
    count_parameters,
    released_parameter_count,
)
from tests.helpers.tolerances import ENCODER_OUTPUT


class ReleasedBlock(nn.Module):
    """An independent reading of the released block, with the released names (see method.md)."""

    def __init__(self, clip_dim=768, llm_dim=2048, heads=8):
        super().__init__()
        self.heads = heads
        self.llm_proj = nn.Linear(llm_dim, clip_dim)
        self.q_norm, self.kv_norm, self.norm = nn.LayerNorm(clip_dim), nn.LayerNorm(clip_dim), nn.LayerNorm(clip_dim)
        self.q_proj, self.k_proj = nn.Linear(clip_dim, clip_dim), nn.Linear(clip_dim, clip_dim)
        self.v_proj, self.out_proj = nn.Linear(clip_dim, clip_dim), nn.Linear(clip_dim, clip_dim)
        self.FFN = nn.Sequential(nn.Linear(clip_dim, 4 * clip_dim), nn.Identity(), nn.Linear(4 * clip_dim, clip_dim))
        for m in self.modules():  # randomise everything, norms included, so a swapped name would show
            if isinstance(m, (nn.Linear, nn.LayerNorm)):
                nn.init.normal_(m.weight, std=0.05 if isinstance(m, nn.Linear) else 0.3, mean=0 if isinstance(m, nn.Linear) else 1)
                nn.init.normal_(m.bias, std=0.1)

    def forward(self, c, l):
        p = self.llm_proj(l)
        cn, pn = self.q_norm(c), self.kv_norm(p)
        b, n, d = pn.shape
        hd = d // self.heads
        q = self.q_proj(pn).view(b, n, self.heads, hd).permute(0, 2, 1, 3)
        k = self.k_proj(cn).view(b, -1, self.heads, hd).permute(0, 2, 1, 3)
        v = self.v_proj(cn).view(b, -1, self.heads, hd).permute(0, 2, 1, 3)
        w = (q @ k.transpose(-1, -2) / hd ** 0.5).softmax(-1)
        p = self.out_proj((w @ v).permute(0, 2, 1, 3).reshape(b, n, d)) + p
        h = self.FFN[0](self.norm(p))
        h = self.FFN[2](h * torch.sigmoid(1.702 * h))
        return torch.cat([c, h + p], dim=1)


class ReleasedFusion(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.CrossFusionModule = nn.ModuleList([ReleasedBlock(**kw)])

    def forward(self, c, l):
        return self.CrossFusionModule[0](c, l)


@pytest.mark.float_sensitive
def test_released_layout_loads_and_matches_outputs(tmp_path):
    torch.manual_seed(0)
    released = ReleasedFusion(clip_dim=96, llm_dim=160, heads=8)
    path = tmp_path / "projector.pth"
    torch.save(released.state_dict(), path)
    ours = CrossAdapter.from_released(path, num_heads=8)
    c, l = torch.randn(2, 77, 96), torch.randn(2, 256, 160)
    out = ours(c, l)
    assert out.shape == (2, 77 + 256, 96)
    # rounding apart (ENCODER_OUTPUT: fused attention against the released written-out one); a released name read
    # into the wrong place moves the output by >= 0.05 (4 heads for 8: 0.054, key and value swapped: 0.35)
    torch.testing.assert_close(out, released(c, l), **ENCODER_OUTPUT.close)
    assert torch.equal(out[:, :77], c)  # CLIP passes through untouched


def test_released_full_size_parameter_count():
    adapter = CrossAdapter()  # SD1.5 + T5-XL widths
    assert count_parameters(adapter) == released_parameter_count() == 8_663_040  # the release's 8.66M
    assert set(convert_released_state_dict(ReleasedFusion().state_dict())) == set(adapter.state_dict())


@pytest.mark.slow
def test_save_and_load_pretrained_roundtrip(tmp_path):
    adapter = CrossAdapter(clip_dim=32, llm_dim=48, num_heads=4, num_blocks=2, llm_scale=0.5)
    adapter.save_pretrained(tmp_path / "cam")
    assert (tmp_path / "cam" / "config.json").exists()
    assert (tmp_path / "cam" / "diffusion_pytorch_model.safetensors").exists()
    loaded = CrossAdapter.from_pretrained(tmp_path / "cam")
    assert loaded.config.num_blocks == 2 and loaded.config.llm_scale == 0.5
    c, l = torch.randn(1, 5, 32), torch.randn(1, 7, 48)
    torch.testing.assert_close(loaded(c, l), adapter(c, l), atol=0, rtol=0)


def test_llm_scale_and_mask():
    torch.manual_seed(0)
    adapter = CrossAdapter(clip_dim=16, llm_dim=24, num_heads=2)
    c, l = torch.randn(2, 4, 16), torch.randn(2, 6, 24)
    base = adapter.fuse(c, l)
    adapter.register_to_config(llm_scale=0.25)
    torch.testing.assert_close(adapter.fuse(c, l), 0.25 * base)
    adapter.register_to_config(llm_scale=1.0, use_llm_mask=True)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6], dtype=torch.bool)
    fused = adapter.fuse(c, l, mask)
    assert torch.all(fused[0, 3:] == 0)
    torch.testing.assert_close(fused[0, :3], base[0, :3])
    torch.testing.assert_close(fused[1], base[1])


def test_gradients_reach_every_parameter_and_not_clip():
    adapter = CrossAdapter(clip_dim=16, llm_dim=24, num_heads=2, num_blocks=2)
    c = torch.randn(2, 4, 16, requires_grad=True)
    adapter(c, torch.randn(2, 6, 24))[:, 4:].square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())


def test_bad_shapes_and_heads_are_refused():
    with pytest.raises(ValueError, match="num_heads=5"):
        CrossAdapter(clip_dim=16, llm_dim=24, num_heads=5)
    adapter = CrossAdapter(clip_dim=16, llm_dim=24, num_heads=2)
    with pytest.raises(ValueError, match="LLM width 24"):
        adapter(torch.randn(1, 4, 16), torch.randn(1, 6, 30))


def test_unknown_released_key_is_refused():
    with pytest.raises(KeyError, match="CrossFusionModule"):
        convert_released_state_dict({"proj.weight": torch.zeros(1)})
