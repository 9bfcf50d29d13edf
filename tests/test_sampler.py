"""The sampler against plain reference computations."""
from __future__ import annotations

import math

import torch

from dashinfer_core.layers.sampler import Sampler, SamplingTensors, apply_penalties, top_k_top_p

V = 50


def tensors(rows: int, **overrides) -> SamplingTensors:
    base = dict(greedy=torch.zeros(rows, dtype=torch.bool), temperature=torch.ones(rows),
                top_k=torch.full((rows,), V), top_p=torch.ones(rows), min_p=torch.zeros(rows),
                seeds=list(range(rows)), steps=[0] * rows,
                all_greedy=False, use_top_k=False, use_top_p=False, use_min_p=False)
    base.update(overrides)
    return SamplingTensors(**base)


def test_penalties_match_a_loop_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, V) * 3
    prompt_out = [[1, 2, 3, 3, 7], [4], [5, 6, 9, 9, 9]]
    outputs = [[3, 7], [], [9, 9, 9]]

    def pad(lists):
        width = max(len(x) for x in lists) or 1
        return torch.tensor([x + [V] * (width - len(x)) for x in lists])

    t = tensors(3, repetition_penalty=torch.tensor([1.3, 1.0, 2.0]), presence_penalty=torch.tensor([0.5, 0.0, 1.0]),
                frequency_penalty=torch.tensor([0.25, 0.0, 0.5]), prompt_and_output_ids=pad(prompt_out),
                output_ids=pad(outputs))
    got = apply_penalties(logits.clone(), t)
    want = logits.clone()
    for r in range(3):
        rp = t.repetition_penalty[r].item()
        for tok in set(prompt_out[r]):
            want[r, tok] = want[r, tok] / rp if want[r, tok] > 0 else want[r, tok] * rp
        for tok in set(outputs[r]):
            count = outputs[r].count(tok)
            want[r, tok] -= t.frequency_penalty[r].item() * count + t.presence_penalty[r].item()
    torch.testing.assert_close(got, want)


def test_top_k_top_p_keep_the_right_tokens():
    torch.manual_seed(1)
    logits = torch.randn(4, V)
    top_k = torch.tensor([V, 5, V, 3])
    top_p = torch.tensor([1.0, 1.0, 0.6, 0.6])
    got = top_k_top_p(logits.clone(), top_k, top_p)
    for r in range(4):
        order = logits[r].argsort(descending=True).tolist()
        keep = order[: top_k[r].item()]
        probs = torch.softmax(logits[r, keep], dim=-1)
        mass, kept = 0.0, []
        for tok, p in zip(keep, probs.tolist()):
            if mass >= top_p[r].item():
                break
            kept.append(tok)
            mass += p
        finite = torch.isfinite(got[r]).nonzero().squeeze(1).tolist()
        assert sorted(finite) == sorted(kept)
        torch.testing.assert_close(got[r, kept], logits[r, kept])


def test_sampling_frequencies_follow_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    rows = 4000
    logits = probs.log().repeat(rows, 1)
    t = tensors(rows, seeds=[i * 7919 for i in range(rows)])
    t.top_k = torch.full((rows,), 4)
    tokens = Sampler()(logits, t).token_ids
    counts = torch.bincount(tokens, minlength=4).float() / rows
    for p, f in zip(probs.tolist(), counts.tolist()):
        assert abs(f - p) < 4 * math.sqrt(p * (1 - p) / rows), (p, f)


def test_min_p_and_greedy_rows():
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0], [0.0, 5.0, 4.0, 1.0]])
    t = tensors(2, greedy=torch.tensor([False, True]), min_p=torch.tensor([0.5, 0.0]), use_min_p=True,
                top_k=torch.full((2,), 4))
    for seed in range(50):
        t.seeds = [seed, seed]
        tokens = Sampler()(logits, t).token_ids.tolist()
        assert tokens[0] in (0, 1)  # p >= 0.5 * p_max
        assert tokens[1] == 1


def test_uniforms_depend_only_on_seed_and_step():
    sampler = Sampler()
    a = sampler.seeded_uniform(tensors(3, seeds=[1, 2, 1], steps=[0, 0, 1]), 1000, torch.device("cpu"))
    b = sampler.seeded_uniform(tensors(2, seeds=[2, 1], steps=[0, 0]), 1000, torch.device("cpu"))
    torch.testing.assert_close(a[0], b[1])
    torch.testing.assert_close(a[1], b[0])
    assert not torch.equal(a[0], a[2])
    assert a.min() > 0 and a.max() < 1
    assert abs(a.mean().item() - 0.5) < 0.02


def test_rows_with_nan_or_inf_logits_get_token_minus_one():
    torch.manual_seed(0)
    logits = torch.randn(5, V) * 30
    logits[1, 7] = float("nan")
    logits[2, 3] = float("inf")
    logits[3, 9] = float("-inf")
    logits[3, 11] = float("inf")
    logits[4] = float("-inf")  # nothing to draw
    logits[0, 5] = float("-inf")  # a token ruled out: the row is fine
    for greedy in (True, False):
        t = tensors(5, greedy=torch.full((5,), greedy), all_greedy=greedy)
        tokens = Sampler()(logits.clone(), t).token_ids.tolist()
        assert tokens[1:] == [-1, -1, -1, -1]
        assert tokens[0] not in (-1, 5)
        if greedy:
            assert tokens[0] == logits[0].argmax().item()


def test_row_max_is_torch_max_on_large_vocabularies():
    from dashinfer_core.layers import sampler
    torch.manual_seed(0)
    past = sampler.NUMPY_ARGMAX_ROWS + 24  # the two-level route (below it: numpy's argmax of whole rows)
    for rows, vocab in ((1, 49152), (7, 5000), (3, 2048 + 100), (2, 100), (past, 49152), (past, 4096 + 77)):
        for layout in ("contiguous", "strided"):  # a strided view goes through an fp32 copy
            x = torch.randn(rows, vocab) if layout == "contiguous" else torch.randn(vocab, rows).t()
            x[0, vocab - 1] = 50.0  # the max in the last block (partial where vocab is not a multiple of 128)
            if rows > 2:
                x[1, 10] = x[1, vocab - 3] = 60.0  # a tie across blocks: the first index wins
                x[2, 200] = float("nan")  # NaN wins its row, as in torch.max
            if rows > 4:
                x[3, 130] = x[3, 131] = 70.0  # a tie inside one block
                x[4, 5] = x[4, 300] = 80.0
                x[4, 301] = float("nan")  # a NaN after a larger value
            want_values, want_index = x.max(dim=-1)
            got_values, got_index = sampler.row_max(x)
            assert torch.equal(got_index, want_index), (rows, vocab, layout)
            assert torch.equal(got_values.nan_to_num(), want_values.nan_to_num()), (rows, vocab, layout)
    for rows in (4, 40):  # half precision: through an fp32 copy, the values back in bf16
        y = torch.randn(rows, 4096).bfloat16()
        values, index = sampler.row_max(y)
        assert torch.equal(index, y.argmax(dim=-1)) and torch.equal(values, y.max(dim=-1).values)


def test_greedy_tokens_on_either_route_is_torch_max_with_faults_marked():
    from dashinfer_core.layers import sampler
    torch.manual_seed(1)
    # whole rows in numpy, the two-level route past NUMPY_ARGMAX_ROWS, and a strided view through a copy
    for rows, strided in ((1, False), (5, False), (sampler.NUMPY_ARGMAX_ROWS + 3, False), (40, True)):
        x = torch.randn(49152 + 17, rows).t() if strided else torch.randn(rows, 49152 + 17)
        x[0, 3] = x[0, 49152 + 5] = 40.0  # a tie across the partial last block: the first index wins
        if rows > 1:
            x[1, 9] = float("nan")
            x[2, :] = float("-inf")  # every token ruled out
            x[3, 77] = float("inf")
        want = torch.where(torch.isfinite(x.max(dim=-1).values), x.max(dim=-1).indices, -1)
        got = sampler.greedy_tokens(x)
        assert got.dtype == torch.int64 and torch.equal(got, want), rows
        assert got[0] == 3 and (rows == 1 or got[1:4].tolist() == [-1, -1, -1])
