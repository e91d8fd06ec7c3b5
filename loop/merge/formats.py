"""How a base checkpoint stores one logical weight, and the arithmetic to read it as float and write it back.

`plain`: one tensor of any float dtype. `fp8_block`: `X.weight` as float8_e4m3fn plus
`X.weight_scale_inv` [ceil(out/128), ceil(in/128)] (DeepSeek-V3 / Qwen3-FP8 style, transformers'
finegrained FP8): W = q * scale_inv per block; requantized with fresh scales amax / 448 per block.
`mxfp4`: `X_blocks` uint8 [..., out, in/32, 16] (32 FP4 E2M1 values per block, two per byte, low
nibble first) and `X_scales` uint8 [..., out, in/32] (E8M0: 2^(s-127)), as GPT-OSS stores its experts;
read as [..., in, out] (transformers' parameter layout) and requantized with fresh shared scales.
The ceil-padded FP8 dequantisation here is exact for any shape. transformers' own (which loads the
proofs' reference and merged models) infers the block size from the scale grid: right for
multiples of 128 or a single partial block, refused or misread otherwise (then base and merged are
misread alike, and the proof is weaker than it looks).
"""
from __future__ import annotations

from dataclasses import dataclass

FP8_MAX = 448.0
FP4_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


@dataclass(frozen=True)
class Stored:
    """One logical weight: its name, its format and the on-disk tensors that hold it."""
    name: str
    format: str  # plain | fp8_block | mxfp4
    keys: tuple[str, ...]


def logical_weights(keys: list[str], quant: dict | None) -> dict[str, Stored]:
    """Every logical weight of a checkpoint from its tensor names (and config's quantization_config)."""
    keyset, out = set(keys), {}
    method = (quant or {}).get("quant_method")
    for k in keys:
        if k.endswith("_blocks") and k[:-7] + "_scales" in keyset:
            name = k[:-7]
            out[name] = Stored(name, "mxfp4", (k, name + "_scales"))
        elif k.endswith("_scales") and k[:-7] + "_blocks" in keyset:
            continue
        elif k.endswith(".weight_scale_inv"):
            continue
        elif k.endswith(".weight") and k + "_scale_inv" in keyset:
            if method != "fp8":
                raise ValueError(f"{k} has a weight_scale_inv but config.json's quantization_config is not fp8")
            out[k] = Stored(k, "fp8_block", (k, k + "_scale_inv"))
        else:
            out[k] = Stored(k, "plain", (k,))
    return out


def block_size(quant: dict | None) -> tuple[int, int]:
    size = (quant or {}).get("weight_block_size") or [128, 128]
    return int(size[0]), int(size[1])


def read_float(stored: Stored, tensors: dict, quant: dict | None):
    """The float32 value of a logical weight from its on-disk tensors."""
    import torch

    if stored.format == "plain":
        return tensors[stored.keys[0]].float()
    if stored.format == "fp8_block":
        return dequant_fp8(tensors[stored.keys[0]], tensors[stored.keys[1]], block_size(quant))
    return dequant_mxfp4(tensors[stored.keys[0]], tensors[stored.keys[1]]).to(torch.float32)


def write_like(stored: Stored, value, tensors: dict, quant: dict | None) -> dict:
    """The on-disk tensors holding `value` in the same format and dtype as before."""
    if stored.format == "plain":
        return {stored.name: value.to(tensors[stored.keys[0]].dtype).contiguous()}
    if stored.format == "fp8_block":
        q, s = quant_fp8(value, block_size(quant))
        return {stored.keys[0]: q, stored.keys[1]: s.to(tensors[stored.keys[1]].dtype)}
    blocks, scales = quant_mxfp4(value)
    return {stored.keys[0]: blocks, stored.keys[1]: scales}


def _expand(scale, shape, bm: int, bn: int):
    rows, cols = shape
    return scale.float().repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]


def dequant_fp8(q, scale_inv, block: tuple[int, int] = (128, 128)):
    import torch

    if scale_inv.dtype == torch.uint8:  # ue8m0 scales
        scale_inv = torch.exp2(scale_inv.float() - 127)
    return q.float() * _expand(scale_inv, q.shape, *block)


def quant_fp8(w, block: tuple[int, int] = (128, 128)):
    """Block-scaled FP8 E4M3 with scale_inv = amax / 448 per block (1 where a block is all zero)."""
    import torch

    bm, bn = block
    rows, cols = w.shape
    r, c = -(-rows // bm), -(-cols // bn)
    padded = torch.zeros(r * bm, c * bn, dtype=torch.float32)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(r, bm, c, bn)
    amax = blocks.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(r * bm, c * bn)[:rows, :cols].contiguous(), scale_inv


def dequant_mxfp4(blocks, scales):
    """[..., out, G, 16] blocks and [..., out, G] scales -> [..., in, out] (in = 32 G)."""
    import torch

    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    lo, hi = lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]
    vals = torch.stack([lo, hi], dim=-1).flatten(-2)  # low nibble first: [..., out, G, 32]
    vals = torch.ldexp(vals, (scales.long() - 127).unsqueeze(-1).to(torch.int32))
    out = vals.flatten(-2)  # [..., out, in]
    return out.transpose(-1, -2).contiguous()


def quant_mxfp4(w):
    """[..., in, out] float -> (blocks, scales) as `dequant_mxfp4` reads them: per 32 values of one
    output row, a shared power-of-two scale with the block's amax at most 6 (the largest E2M1)."""
    import torch

    x = w.float().transpose(-1, -2)  # [..., out, in]
    *lead, rows, cols = x.shape
    if cols % 32:
        raise ValueError(f"an MXFP4 tensor's input dimension must be a multiple of 32, got {cols}")
    x = x.reshape(*lead, rows, cols // 32, 32)
    amax = x.abs().amax(-1, keepdim=True)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=1e-30))) - 2, torch.full_like(amax, -127))
    exp = exp.clamp(-127, 127)
    y = (x / torch.exp2(exp)).clamp(-6, 6)
    positive = torch.tensor(FP4_VALUES[:8])
    code = (y.abs().unsqueeze(-1) - positive).abs().argmin(-1) | ((y < 0).long() << 3)
    code = code.to(torch.uint8)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).contiguous()
    return blocks, (exp.squeeze(-1) + 127).to(torch.uint8)
