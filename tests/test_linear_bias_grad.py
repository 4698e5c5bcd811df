"""d(bias) of the fused linear log-probs on the Triton path: with bf16 / fp16 hidden states and weight and an
fp32 bias, the gradient is summed from the fp32 d(logits) (the kernel's per-token-block column sums), not from
the d(logits) buffer rounded to the input dtype for the d(hidden) and d(weight) products (docs/backends.md)."""
from __future__ import annotations

import pytest
import torch

import fastalign
from conftest import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (the interpreter on CPU tensors)")

# interpreter tiles are 16 tokens x 64 ids: 3 token blocks, 3 vocabulary tiles (the last ragged), and with
# chunks of 24 tokens two chunks, each of several token blocks
N, H, V = 40, 16, 150


def _inputs(dtype):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = torch.randn(V, H, generator=g).to(dtype)
    bias = torch.randn(V, generator=g) * 3  # fp32
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[1, 5, 17, 18, 30]] = -100  # ignored rows, in several token blocks
    w_lp, w_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    return hidden, weight, bias, labels, w_lp, w_ent


def _reference_bias_grad(hidden, weight, bias, labels, w_lp, w_ent, softcap):
    """float64 d(bias) of sum(w_lp * logprob + w_ent * entropy) over the labelled rows."""
    b = bias.double().requires_grad_(True)
    z = hidden.double() @ weight.double().T + b
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, -1)
    keep = labels != -100
    lp = logp.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    ent = -(logp.exp() * logp).sum(1)
    ((w_lp.double() * lp + w_ent.double() * ent) * keep).sum().backward()
    return b.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("compaction", ["1", "0"])
@pytest.mark.parametrize("softcap", [None, 5.0], ids=["plain", "softcap"])
def test_triton_bias_grad_is_fp32_accurate(dtype, compaction, softcap, monkeypatch):
    monkeypatch.setenv("FASTALIGN_DEVICE_COMPACTION", compaction)
    hidden, weight, bias0, labels, w_lp, w_ent = _inputs(dtype)
    bias = bias0.clone().requires_grad_(True)
    st = fastalign.linear_logprobs(hidden, weight, labels, bias=bias, softcap=softcap, entropy=True,
                                   backend="triton", chunk=(24, 64))
    (w_lp * st.logprobs + w_ent * st.entropy).sum().backward()
    want = _reference_bias_grad(hidden, weight, bias0, labels, w_lp, w_ent, softcap)
    assert bias.grad.dtype == torch.float32
    err = ((bias.grad.double() - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5, f"d(bias) relative error {err:.2e} (from d(logits) rounded to the input dtype: 1e-4 to 1e-2)"
