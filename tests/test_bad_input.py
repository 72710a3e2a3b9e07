"""Bad input gives a ValueError/TypeError naming the argument and what is accepted."""

import pytest
import torch

from flashverify.kernels import attention, dropout_mask, sdpa


def qkv(device, B=1, H=2, Hkv=2, nq=8, nk=8, D=16, dtype=torch.float16):
    g = torch.Generator().manual_seed(0)
    make = lambda h, n: torch.randn(B, h, n, D, generator=g).to(dtype).to(device)
    return make(H, nq), make(Hkv, nk), make(Hkv, nk)


BAD = [
    # (description, build(device) -> (args, kwargs), exception, text the message must contain)
    ("rank", lambda d: ((qkv(d)[0][0], *qkv(d)[1:]), {}), ValueError, "q must have 4 dimensions"),
    ("not a tensor", lambda d: (([1.0], *qkv(d)[1:]), {}), TypeError, "q must be a torch.Tensor"),
    ("int dtype", lambda d: ((qkv(d)[0].to(torch.int32), *qkv(d)[1:]), {}), TypeError, "q.dtype must be one of"),
    ("fp64", lambda d: (tuple(t.double() for t in qkv(d)), {}), TypeError, "float16, bfloat16, float32"),
    ("mixed dtypes", lambda d: ((qkv(d)[0], qkv(d)[1].float(), qkv(d)[2]), {}), TypeError, "share a dtype"),
    ("k/v shapes", lambda d: ((*qkv(d)[:2], qkv(d, nk=9)[2]), {}), ValueError, "k and v must have the same shape"),
    ("batch", lambda d: ((qkv(d, B=2)[0], *qkv(d)[1:]), {}), ValueError, "batch sizes differ"),
    ("head dim mismatch", lambda d: ((qkv(d, D=32)[0], *qkv(d)[1:]), {}), ValueError, "head dims differ"),
    ("D > 256", lambda d: (qkv(d, D=264), {}), ValueError, "head dim D must be in [1, 256]"),
    ("GQA not multiple", lambda d: (qkv(d, H=3, Hkv=2), {}), ValueError, "multiple of key/value heads"),
    ("window conflicts causal", lambda d: (qkv(d), {"causal": True, "window": (4, 2)}), ValueError,
     "right 0 or None"),
    ("window negative", lambda d: (qkv(d), {"window": (-1, 2)}), ValueError, "window left must be an int >= 0"),
    ("window shape", lambda d: (qkv(d), {"window": 4}), ValueError, "window must be a pair"),
    ("alignment", lambda d: (qkv(d), {"causal": True, "causal_alignment": "top"}), ValueError,
     "causal_alignment must be one of"),
    ("dropout 1", lambda d: (qkv(d), {"dropout_p": 1.0}), ValueError, "dropout_p must be a float in [0, 1)"),
    ("dropout negative", lambda d: (qkv(d), {"dropout_p": -0.1}), ValueError, "dropout_p"),
    ("seed", lambda d: (qkv(d), {"dropout_p": 0.1, "seed": -3}), ValueError, "seed must be an int in [0, 2**31)"),
    ("scale nan", lambda d: (qkv(d), {"scale": float("nan")}), ValueError, "scale must be a finite float"),
    ("scale inf", lambda d: (qkv(d), {"scale": float("inf")}), ValueError, "scale must be a finite float"),
    ("mask shape", lambda d: (qkv(d), {"attn_mask": torch.ones(3, 8, dtype=torch.bool, device=d)}), ValueError,
     "does not broadcast to (B, Hq, Nq, Nk)"),
    ("mask dtype", lambda d: (qkv(d), {"attn_mask": torch.ones(8, 8, dtype=torch.int32, device=d)}), TypeError,
     "attn_mask.dtype must be bool"),
    ("mask nan", lambda d: (qkv(d), {"attn_mask": torch.full((8, 8), float("nan"), device=d)}), ValueError,
     "finite values or -inf"),
    ("key_lengths range", lambda d: (qkv(d), {"key_lengths": torch.tensor([9], device=d)}), ValueError,
     "key_lengths must lie in [0, Nk=8]"),
    ("key_lengths shape", lambda d: (qkv(d), {"key_lengths": torch.tensor([1, 2], device=d)}), ValueError,
     "key_lengths must have shape (B,)"),
    ("key_lengths dtype", lambda d: (qkv(d), {"key_lengths": torch.tensor([1.0], device=d)}), TypeError,
     "key_lengths must be an int32/int64 tensor"),
    ("empty sequence", lambda d: (qkv(d, nk=0), {}), ValueError, "sequence lengths must be >= 1"),
    ("blocks", lambda d: (qkv(d), {"blocks": (24, 16)}), ValueError, "powers of two >= 16"),
    ("causal not bool", lambda d: (qkv(d), {"causal": "yes"}), TypeError, "causal must be a bool"),
]


@pytest.mark.parametrize("build,exc,text", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_named(build, exc, text, device):
    args, kwargs = build(device)
    with pytest.raises(exc) as info:
        attention(*args, **kwargs)
    assert text in str(info.value)


def test_device_mismatch(device):
    if device == "cpu":
        q, k, v = qkv("cpu")
        with pytest.raises(ValueError, match="key_lengths is on"):
            attention(q, k, v, key_lengths=torch.tensor([3], device="meta"))
    else:
        q, k, v = qkv(device)
        with pytest.raises(ValueError, match="must share a device"):
            attention(q, k.cpu(), v)


def test_sdpa_rejects_what_torch_rejects(device):
    q, k, v = qkv(device, H=4, Hkv=2)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        sdpa(q, k, v)
    q, k, v = qkv(device)
    with pytest.raises(ValueError, match="attn_mask and is_causal"):
        sdpa(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.bool, device=device), is_causal=True)


def test_dropout_mask_arguments():
    with pytest.raises(ValueError, match="shape must be"):
        dropout_mask(1, (2, 3), 0.5)
    with pytest.raises(ValueError, match="dropout_p"):
        dropout_mask(1, (1, 1, 2, 2), 1.5)
