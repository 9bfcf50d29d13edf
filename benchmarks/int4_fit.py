"""Why int4 in groups of 128 keeps integer zero points: perplexity of the embedded model (HF transformers, fp32,
the text of benchmarks/quant.py) with every linear layer's weight replaced by its int4 group-128 round trip,
for several ways of choosing each group's grid. Not a test; the figures go into the README.

    python benchmarks/int4_fit.py [--group 128] [--threads 2]

Rows:
  integer zero    min/max over a range holding 0, zero point rounded (what iq-int4 does for groups > 32)
  float zero      the same scale, zero point not rounded (0.0 falls between two levels)
  half step off   the integer-zero grid shifted by half a step
  hqq p=0.7       zero point searched to minimise sum |error|^0.7 (half-quadratic updates, as HQQ does)
  hadamard 64     weights rotated by a random-sign 64-wide Hadamard transform, quantized, rotated back
  act-weighted    iq-int4's group-32 search (quant/weights.py) with each error weighted by its input
                  channel's mean square on 256 random tokens (a calibration on random data: what weighting
                  alone can recover)
  outlier cols 8  integer zero, with the 8 input channels of largest mean square (random tokens) kept exact
                  and left out of their groups' ranges (the outlier split of LLM.int8 / SpQR)
  gptq            GPTQ's column-by-column error feedback (integer-zero grid), Hessian from 512 random tokens

--by-type: the integer-zero grid on one kind of projection at a time (the others exact), and on one layer.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "public_domain_prose.txt"
QMAX = 15


def grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """[N, K] -> [N, G, group], the last group padded by repeating its last column (min/max unchanged)."""
    n, k = w.shape
    groups = -(-k // group)
    return torch.nn.functional.pad(w.float()[None], (0, groups * group - k), mode="replicate")[0].view(n, groups, group)


def ungrouped(g: torch.Tensor, k: int) -> torch.Tensor:
    return g.reshape(g.shape[0], -1)[:, :k]


def iq_int4(w, group):
    """The round trip iq-int4 itself does for groups over 32 (quant/weights.py)."""
    from dashinfer_core.quant.weights import dequantize, quantize
    return dequantize(quantize(w, 4, group))


def min_max(w, group, zero_rounding: bool, shift: float = 0.0):
    """min/max over a range holding 0 (as iq-int4 above group 32), with the variations the rows measure."""
    g = grouped(w, group)
    lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / QMAX).clamp(min=1e-8)
    zero = -lo / scale
    zero = (torch.round(zero) if zero_rounding else zero) + shift
    q = torch.clamp(torch.round(g / scale + zero), 0, QMAX)
    return ungrouped((q - zero) * scale, w.shape[1])


def hqq(w, group, p: float = 0.7, iters: int = 20, beta: float = 10.0, kappa: float = 1.01):
    g = grouped(w, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / QMAX).clamp(min=1e-8)
    zero = torch.round(-lo / scale)
    best_err, best_zero = None, zero
    for _ in range(iters):
        q = torch.clamp(torch.round(g / scale + zero), 0, QMAX)
        err = g - (q - zero) * scale
        total = err.abs().pow(p).sum(-1, keepdim=True)
        better = torch.ones_like(total, dtype=torch.bool) if best_err is None else total < best_err
        best_err = total if best_err is None else torch.where(better, total, best_err)
        best_zero = torch.where(better, zero, best_zero)
        shrunk = torch.sign(err) * torch.relu(err.abs() - err.abs().clamp(min=1e-12).pow(p - 1) / beta)
        zero = (q - (g - shrunk) / scale).mean(-1, keepdim=True)
        beta *= kappa
    q = torch.clamp(torch.round(g / scale + best_zero), 0, QMAX)
    return ungrouped((q - best_zero) * scale, w.shape[1])


def hadamard(w, group, width: int = 64):
    n, k = w.shape
    h = torch.ones(1, 1)
    while h.shape[0] < width:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / width ** 0.5
    sign = (torch.randint(0, 2, (k,), generator=torch.Generator().manual_seed(0)) * 2 - 1).float()
    rotated = ((w * sign).view(n, k // width, width) @ h).view(n, k)
    back = (min_max(rotated, group, True).view(n, k // width, width) @ h.T).view(n, k)
    return back * sign


def weighted_fit(w, group, weight: torch.Tensor):
    """iq-int4's own search for groups of up to 32 (quant/weights.py: candidate ranges, each refit by least
    squares, the smallest squared error wins), with each element's squared error weighted by `weight` [K]."""
    from dashinfer_core.quant.weights import SEARCH_STEPS, _fit_groups
    g = grouped(w, group)
    wt = grouped(weight[None], group)[0]
    # the padded tail of the last group weighs nothing
    wt = wt * (torch.arange(wt.numel()).view(wt.shape) < w.shape[1])
    scale, minimum = _fit_groups(g, wt, g.amin(-1), g.amax(-1), QMAX, SEARCH_STEPS)
    q = torch.clamp(torch.round((g - minimum[..., None]) / scale[..., None]), 0, QMAX)
    return ungrouped(q * scale[..., None] + minimum[..., None], w.shape[1])


def outlier_columns(w, group, mean_sq, count: int = 8):
    cols = mean_sq.topk(count).indices
    rest = w.clone()
    rest[:, cols] = 0
    out = iq_int4(rest, group)
    out[:, cols] = w[:, cols]
    return out


def gptq(w, group, hessian, damp: float = 0.01, block: int = 128):
    """Columns quantized in order, each one's error spread over the columns not yet quantized through the
    inverse Hessian's Cholesky factor; each group's integer-zero grid taken from its updated weights."""
    work = w.double().clone()
    k = work.shape[1]
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    work[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.zeros_like(work)
    scale = zero = None
    for start in range(0, k, block):
        end = min(start + block, k)
        cols, errs = work[:, start:end].clone(), torch.zeros(work.shape[0], end - start, dtype=work.dtype)
        for i in range(end - start):
            if (start + i) % group == 0:
                g = torch.cat([cols[:, i:], work[:, end:]], 1)[:, :group]
                lo, hi = g.amin(1).clamp(max=0), g.amax(1).clamp(min=0)
                scale = ((hi - lo) / QMAX).clamp(min=1e-8)
                zero = torch.round(-lo / scale).clamp(0, QMAX)
            q = (torch.clamp(torch.round(cols[:, i] / scale) + zero, 0, QMAX) - zero) * scale
            out[:, start + i] = q
            err = (cols[:, i] - q) / hinv[start + i, start + i]
            cols[:, i:] -= err[:, None] * hinv[start + i, start + i:end][None]
            errs[:, i] = err
        work[:, end:] -= errs @ hinv[start:end, end:]
    return out.float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--by-type", action="store_true", help="one kind of projection (or one layer) at a time")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dashinfer_core.loader import default_model_dir
    model_dir = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode(TEXT.read_text())])
    linears = {name: m for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")}
    original = {name: m.weight.detach().clone() for name, m in linears.items()}

    @torch.no_grad()
    def perplexity() -> float:
        return math.exp(model(ids, labels=ids).loss.item())

    # Input statistics per linear layer on random tokens: mean squares from the first 256 (act-weighted,
    # outlier columns), X^T X over 512 (gptq).
    mean_sq, gram, rows = {}, {}, {}

    def record(name, inp):
        x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
        mean_sq.setdefault(name, x.pow(2).mean(0).float())
        gram[name] = gram.get(name, 0) + x.T @ x
        rows[name] = rows.get(name, 0) + x.shape[0]

    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: record(name, inp))
             for name, m in linears.items()]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randint(0, len(tokenizer), (1, 256), generator=generator))
    for hook in hooks:
        hook.remove()

    base = perplexity()
    group = args.group
    methods = [
        ("integer zero", lambda name, w: iq_int4(w, group)),
        ("float zero", lambda name, w: min_max(w, group, False)),
        ("half step off", lambda name, w: min_max(w, group, True, 0.5)),
        ("hqq p=0.7", lambda name, w: hqq(w, group)),
        ("hadamard 64", lambda name, w: hadamard(w, group)),
        ("act-weighted", lambda name, w: weighted_fit(w, group, mean_sq[name])),
        ("outlier cols 8", lambda name, w: outlier_columns(w, group, mean_sq[name])),
        ("gptq", lambda name, w: gptq(w, group, gram[name] / rows[name])),
    ]
    selected = lambda name: True  # noqa: E731
    if args.by_type:
        kinds = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        methods = [(kind, lambda name, w: iq_int4(w, group)) for kind in kinds] + \
            [(f"layer {i}", lambda name, w: iq_int4(w, group)) for i in (0, 1, 15, 28, 29)]
    print(f"SmolLM2-135M-Instruct (embedded), {ids.shape[1]} tokens, int4 groups of {group}; fp32 perplexity "
          f"{base:.3f}\n\n| grid | perplexity | vs fp32 |\n|---|---|---|")
    for label, method in methods:
        start = time.perf_counter()
        if args.by_type:
            selected = (lambda name, label=label: name.endswith(label)) if label.endswith("proj") else \
                (lambda name, label=label: f"layers.{label.split()[1]}." in name)
        with torch.no_grad():
            for name, m in linears.items():
                if selected(name):
                    m.weight.copy_(method(name, original[name]))
        ppl = perplexity()
        print(f"| {label} | {ppl:.3f} | {100 * (ppl / base - 1):+.1f} % |  ({time.perf_counter() - start:.0f} s)",
              flush=True)
        with torch.no_grad():
            for name, m in linears.items():
                m.weight.copy_(original[name])


if __name__ == "__main__":
    main()
