"""The benchmark peers (``benchmarks/peers.py``) compute the tower they replace: a speed row is only honest if its
output is the model's. On the CPU: the GEMM patch embedding and the SDPA attention against open_clip's own modules
(fp32, so equal up to float rounding), the registry's names and labels."""

from __future__ import annotations

import pytest
import torch
from open_clip.transformer import VisionTransformer

from benchmarks.peers import PEERS, PatchGEMM, SDPAAttention


def _tower() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=2.0, output_dim=16
    ).eval()


def test_patch_gemm_equals_the_conv():
    conv = _tower().conv1
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(PatchGEMM(conv)(x), conv(x), rtol=1e-5, atol=1e-5)


def test_sdpa_attention_equals_multihead_attention():
    mha = _tower().transformer.resblocks[0].attn
    x = torch.randn(2, 17, 64)
    want, _ = mha(x, x, x, need_weights=False)
    got, _ = SDPAAttention(mha, fp8=False)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_swapped_modules_give_the_towers_output():
    """The whole fp32 tower with both replacements (what peer_tower builds, minus the bf16 cast and device)."""
    import copy

    tower = _tower()
    peer = copy.deepcopy(tower)
    peer.conv1 = PatchGEMM(peer.conv1)
    for blk in peer.transformer.resblocks:
        blk.attn = SDPAAttention(blk.attn, fp8=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(peer(x), tower(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PEERS))
def test_registry_labels_are_picked_as_peers(name):
    from benchmarks.peer_report import PEERS as PEER_PREFIXES

    label, build = PEERS[name]
    assert label.startswith(PEER_PREFIXES) and callable(build)
