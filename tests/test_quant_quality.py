"""fp8 and int8 ZeRO-3 gathers on the real demo model lose no more than the standard schemes do.

The reference is HF's model with its matrices quantized per checkpoint tensor, the way
the gathers do it: fp8 e4m3 with one scale per tensor (448 / abs-max), int8 with one
scale per row (abs-max / 127), 1-D tensors left alone. The measure is the mean KL
divergence of each quantized model's next-token distribution from fp32's, over a
passage of ordinary prose.
"""

from __future__ import annotations

import pytest
import torch
import zero3_workers as zw

from shardwise import launch
from shardwise.model.text import Text

PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs twice each night, once at dusk to light the lamp and again "
    "after midnight to trim the wick. In winter the wind pressed against the glass so hard that the whole tower "
    "hummed, and the gulls sheltered on the leeward ledge in a long grey row. She kept a logbook of every ship "
    "that passed: its flag, its heading, and whether it answered her signal. Most nights nothing answered. When "
    "the supply boat came in spring, the captain brought oranges, letters, and a newspaper already three weeks "
    "old, which she read slowly, one column each evening, to make it last until the next boat."
)
BOUND = 1.2  # the gathers' KL may exceed the reference scheme's by at most this factor
DP = 2  # chunks split rows between ranks, and the 1-D members' raw bytes too


def hf_quantized(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` quantized and dequantized per checkpoint tensor: fp8 one scale, int8 one scale per row."""
    limit = 448.0 if dtype == torch.float8_e4m3fn else 127.0
    w = weight.float()
    m = w.abs().amax(dim=1, keepdim=True) if dtype == torch.int8 else w.abs().amax()
    s = torch.where(m > 0, m / limit, torch.ones_like(m))
    q = (w / s).clamp(-limit, limit)
    q = q.round() if dtype == torch.int8 else q.to(dtype).float()
    return q * s


def kl_from(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(softmax(reference) || softmax(logits)), in fp64."""
    p = reference.double().log_softmax(-1)
    q = logits.double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.fixture(scope="module")
def divergences(smollm2) -> dict[torch.dtype, tuple[float, float]]:
    """Per quantized dtype: (KL of shardwise's gathers, KL of HF's model quantized the same way) from HF's fp32."""
    import transformers

    path = smollm2[1]  # imported in float32 (conftest)
    ids = torch.tensor([Text(path).encode(PASSAGE)])
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    originals = {name: p.detach().clone() for name, p in model.named_parameters() if p.dim() == 2}
    out = {}
    with torch.no_grad():
        fp32 = model(ids).logits[0]
        for dtype in zw.QUANTIZED:
            for name, p in model.named_parameters():
                if name in originals:
                    p.copy_(hf_quantized(originals[name], dtype))
            out[dtype] = kl_from(fp32, model(ids).logits[0])
            for name, p in model.named_parameters():
                if name in originals:
                    p.copy_(originals[name])
    gathered = launch(zw.logits_by_work_dtype, DP, str(path), DP, ids, list(zw.QUANTIZED), timeout=600)
    return {dtype: (kl_from(fp32, logits[0]), out[dtype]) for dtype, logits in zip(zw.QUANTIZED, gathered)}


@pytest.mark.parametrize("dtype", zw.QUANTIZED, ids=str)
def test_quantized_gathers_lose_no_more_than_the_standard_scheme(divergences, dtype):
    ours, reference = divergences[dtype]
    assert reference > 0, "the reference scheme changed nothing: the comparison would prove nothing"
    assert ours <= BOUND * reference, f"{dtype} gathers: KL {ours:.4f} from fp32, the per-tensor scheme {reference:.4f}"
