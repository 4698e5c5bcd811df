"""Advantage estimators (docs/math.md#advantages) written as plain per-group Python loops over
float64 Python numbers: the test oracle. Also the two benchmark baselines for
GRPO: the dict-of-lists loop trainers commonly run, and a vectorised PyTorch
version (``torch.unique`` + ``index_add_``)."""
from __future__ import annotations

import math
from collections import defaultdict

import torch


def _isnan(x: float) -> bool:
    return x != x


def _keys(index, group_size, B):
    """Group keys as hashable Python values (a tensor's elements would hash by identity)."""
    if index is not None:
        if isinstance(index, torch.Tensor):
            return index.tolist()
        return [k.item() if hasattr(k, "item") and getattr(k, "ndim", None) == 0 else k for k in index]
    return [i // group_size for i in range(B)]


def group_stats(scores, index=None, group_size=None, lengths=None):
    """{key: dict(count, mean, std, max, second, wmean)} over the non-NaN scores of each group."""
    r = [float(x) for x in scores.tolist()]
    B = len(r)
    keys = _keys(index, group_size, B)
    lens = [1.0] * B if lengths is None else [float(x) for x in lengths.tolist()]
    members = defaultdict(list)
    for i, k in enumerate(keys):
        members[k].append(i)
    out = {}
    for k, idx in members.items():
        vals = [r[i] for i in idx if not _isnan(r[i])]
        ls = [lens[i] for i in idx if not _isnan(r[i])]
        n = len(vals)
        mean = sum(vals) / n if n else 0.0
        if n and max(vals) == min(vals):
            mean = vals[0]  # equal scores: exactly that value, so r - mean is exactly 0
        std = math.sqrt(sum((x - mean) ** 2 for x in vals) / (n - 1)) if n > 1 else 0.0
        srt = sorted(vals, reverse=True)
        mx = srt[0] if n else -math.inf
        second = srt[1] if n > 1 else -math.inf
        lsum = sum(ls)
        wmean = sum(l * x for l, x in zip(ls, vals)) / lsum if lsum > 0 and max(vals) != min(vals) else mean
        out[k] = dict(count=n, mean=mean, std=std, max=mx, second=second, wmean=wmean)
    return out


def _per_score(r, keys, st, fn, singleton):
    out = []
    for x, k in zip(r, keys):
        s = st[k]
        if _isnan(x):
            out.append(0.0)
        elif s["count"] < 2:
            out.append(0.0 if singleton == "zero" else x)  # "raw"; "unit_std" is handled by grpo
        else:
            out.append(fn(x, s))
    return out


def _over(num, den):
    """``num / den``; ``den = std + eps = 0`` (eps 0, equal scores) divides by 1: ``num`` is exactly 0 there."""
    return num if den == 0 else num / den


def _batch_std(r):
    vals = [x for x in r if not _isnan(x)]
    n = len(vals)
    if n < 2:
        return 0.0
    mean = sum(vals) / n
    return math.sqrt(sum((x - mean) ** 2 for x in vals) / (n - 1))


def _token_whiten(a, r, lengths, B):
    """Per-sequence values spread over L_i tokens each, whitened over those tokens (eps 1e-8)."""
    lens = [float(v) for v in lengths.tolist()]
    tokens = [v for i, v in enumerate(a) if not _isnan(r[i]) for _ in range(int(lens[i]))]
    n = len(tokens)
    mean = sum(tokens) / n if n else 0.0
    var = sum((t - mean) ** 2 for t in tokens) / (n - 1) if n > 1 else 0.0
    inv = 1.0 / math.sqrt(var + 1e-8)
    return [0.0 if _isnan(r[i]) or lens[i] == 0 else (a[i] - mean) * inv for i in range(B)]


def _one(r, keys, estimator, eps, std, singleton, lengths, reward_weights, B, batch_normalization="sequence"):
    """Advantages as a list of floats for one estimator on one grouping."""
    if estimator == "gdpo":
        K = len(r[0]) if B else 0
        w = [1.0] * K if reward_weights is None else [float(v) for v in reward_weights]
        total = [0.0] * B
        for k in range(K):
            col = [row[k] for row in r]
            a = _one(col, keys, "grpo", eps, std, singleton, lengths, None, B)
            total = [t + w[k] * v for t, v in zip(total, a)]
        missing = [all(_isnan(v) for v in row) for row in r]
        if any(not m and not math.isfinite(t) for m, t in zip(missing, total)):  # an infinite reward
            return [math.nan] * B  # IEEE arithmetic: the batch mean and std are NaN
        total = [math.nan if m else t for m, t in zip(missing, total)]
        if batch_normalization == "token":
            return _token_whiten(total, total, lengths, B)
        return _one(total, [0] * B, "grpo", eps, "group", "raw" if singleton == "unit_std" else singleton, None,
                    None, B)
    st = group_stats(torch.tensor(r, dtype=torch.float64), keys, lengths=lengths)
    if estimator == "grpo":
        bs = _batch_std(r)
        div = {"group": lambda s: s["std"] + eps, "batch": lambda s: bs + eps, "none": lambda s: 1.0}[std]
        out = _per_score(r, keys, st, lambda x, s: _over(x - s["mean"], div(s)), singleton)
        if singleton == "unit_std" and std == "group":  # a group of one: mean 0, std 1
            out = [x / (1.0 + eps) if not _isnan(x) and st[k]["count"] == 1 else o for x, k, o in zip(r, keys, out)]
        return out
    if estimator == "rloo":
        return _per_score(r, keys, st, lambda x, s: (x - s["mean"]) * s["count"] / (s["count"] - 1), singleton)
    if estimator == "opo":
        return _per_score(r, keys, st, lambda x, s: x - s["wmean"], singleton)
    if estimator == "gpg":
        alpha = B / max(sum(1 for x in r if not _isnan(x) and x != 0), 1)
        out = _per_score(r, keys, st, lambda x, s: alpha * (x - s["mean"]), singleton)
        if singleton == "unit_std":  # a group of one: mean 0
            out = [alpha * x if not _isnan(x) and st[k]["count"] == 1 else o for x, k, o in zip(r, keys, out)]
        return out
    if estimator == "grpo_passk":
        bs = _batch_std(r)
        div = {"group": lambda s: s["std"] + eps, "batch": lambda s: bs + eps, "none": lambda s: 1.0}[std]

        def passk(x, s):
            return _over(s["max"] - s["second"], div(s)) if x == s["max"] else 0.0
        return _per_score(r, keys, st, passk, singleton)
    if estimator == "reinforce_pp_baseline":
        a = _per_score(r, keys, st, lambda x, s: x - s["mean"], singleton)
        # spread over tokens: sequence i contributes L_i tokens of value a_i
        return _token_whiten(a, r, lengths, B)
    raise ValueError(estimator)


def group_advantages(scores, index=None, *, group_size=None, estimator="grpo", eps=1e-6, std="group",
                     singleton="raw", lengths=None, reward_weights=None, step_index=None, step_scores=None,
                     omega=1.0, batch_normalization="sequence"):
    """float64 advantages, one per score, from per-group loops (same arguments as fastalign's)."""
    B = scores.shape[0]
    r = scores.double().tolist()
    keys = _keys(index, group_size, B)
    adv = _one(r, keys, estimator, eps, std, singleton, lengths, reward_weights, B, batch_normalization)
    if step_index is not None:
        sr = r if step_scores is None else step_scores.double().tolist()
        step = _one(sr, _keys(step_index, None, B), estimator, eps, std, singleton, lengths, reward_weights, B,
                    batch_normalization)  # the step term: the same estimator with the same options
        adv = [a + omega * s for a, s in zip(adv, step)]
    return torch.tensor(adv, dtype=torch.float64)


# ---------------------------------------------------------------- token level
def masked_whiten(x, mask, eps=1e-8, unbiased=True):
    """0/1 masks: unbiased (verl) ``/ sqrt(var + eps)``; biased (OpenRLHF) ``/ sqrt(max(var, eps))``."""
    vals = [v for v, m in zip(x.flatten().tolist(), mask.flatten().tolist()) if m]
    n = len(vals)
    mean = sum(vals) / n if n else 0.0
    sq = sum((v - mean) ** 2 for v in vals)
    if unbiased:
        std = math.sqrt((sq / (n - 1) if n > 1 else 0.0) + eps)
    else:
        std = math.sqrt(max(sq / n if n else 0.0, eps))
    return torch.where(mask != 0, (x - mean) / std * mask, 0.0)


def discounted_returns(x, mask, gamma, reset=True):
    """Per row, from the last token: run = x_t m_t + gamma run; out_t = run m_t; run *= m_t if reset.
    A masked token (m_t = 0) is skipped: its x_t is never read, its output is 0 and (reset) the run restarts
    there, so a NaN or inf after it never reaches the tokens before it."""
    B, T = x.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        run = 0.0
        for t in reversed(range(T)):
            m = float(mask[b, t])
            run = (float(x[b, t]) * m if m != 0 else 0.0) + gamma * run
            out[b, t] = run * m if m != 0 else 0.0
            if reset:
                run = run * m if m != 0 else 0.0
    return out


def reinforce_pp_advantages(rewards, mask, gamma=1.0, whiten=True, unbiased=True, reset_at_masked=True):
    mask = mask.double()
    g = discounted_returns(rewards.double(), mask, gamma, reset=reset_at_masked)
    return masked_whiten(g, mask, unbiased=unbiased) if whiten else g


def remax_advantages(rewards, mask, baseline):
    mask = mask.double()
    g = discounted_returns(rewards.double(), mask, 1.0, reset=False)
    return torch.where(mask != 0, g - baseline.double()[:, None] * mask, 0.0)


def gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0, whiten=True):
    """GAE skipping masked tokens (they pass V_next and A_next through unchanged)."""
    B, T = rewards.shape
    mask = mask.double()
    adv = torch.zeros(B, T, dtype=torch.float64)
    ret = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        next_v, a_next = 0.0, 0.0
        for t in reversed(range(T)):
            if mask[b, t]:
                v = float(values[b, t])
                a_next = float(rewards[b, t]) + gamma * next_v - v + gamma * lam * a_next
                next_v = v
                adv[b, t] = a_next
                ret[b, t] = a_next + v
    return (masked_whiten(adv, mask) if whiten else adv), ret


def implicit_process_advantages(logprobs, ref_logprobs, mask, outcome_advantages=None, beta=0.05, gamma=1.0):
    mask = mask.double()
    r = discounted_returns(beta * (logprobs.double() - ref_logprobs.double()), mask, gamma)
    if outcome_advantages is not None:
        r = torch.where(mask != 0, r + outcome_advantages.double()[:, None] * mask, 0.0)
    return r


# ---------------------------------------------------------------- benchmark baselines
def iw_opd_advantages(teacher_logprobs, rollout_logprobs, mask, gamma=0.5, eps=1e-8):
    """IW-OPD in float64, a position at a time: ``a_t = (lt - lr) m_t``,
    ``A_t = (1 + gamma (1 - sum_{s<t} |a_s| / max(sum_s |a_s|, eps))) a_t``."""
    B, T = teacher_logprobs.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        a = [float(teacher_logprobs[i, t]) - float(rollout_logprobs[i, t]) if mask[i, t] else 0.0 for t in range(T)]
        total = max(sum(abs(x) for x in a), eps)
        prefix = 0.0
        for t in range(T):
            out[i, t] = (1.0 + gamma * (1.0 - prefix / total)) * a[t]
            prefix += abs(a[t])
    return out


def grpo_python_loop(scores, index, eps=1e-6):
    """GRPO the way trainers commonly write it: a dict of lists of per-response
    score tensors, torch.mean / torch.std per group, then a loop over responses."""
    id2score = defaultdict(list)
    id2mean, id2std = {}, {}
    scores = scores.clone()
    bsz = scores.shape[0]
    for i in range(bsz):
        id2score[index[i]].append(scores[i])
    for idx, vals in id2score.items():
        if len(vals) == 1:
            id2mean[idx] = torch.tensor(0.0)
            id2std[idx] = torch.tensor(1.0)
        else:
            t = torch.stack(vals)
            id2mean[idx] = torch.mean(t)
            id2std[idx] = torch.std(t)
    for i in range(bsz):
        scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + eps)
    return scores


def grpo_vectorized(scores, index, eps=1e-6):
    """GRPO in vectorised PyTorch: dense ids by torch.unique, sums by index_add_
    (float64), NaN scores excluded and set to 0, groups of one pass through."""
    _, inv = torch.unique(index, return_inverse=True)
    B = scores.shape[0]
    valid = ~torch.isnan(scores)
    x = torch.where(valid, scores, 0.0).double()
    v = valid.double()
    cnt = torch.zeros(B, dtype=torch.float64).index_add_(0, inv, v)
    mean = torch.zeros(B, dtype=torch.float64).index_add_(0, inv, x) / cnt.clamp_min(1.0)
    d = (x - mean[inv]) * v
    var = torch.zeros(B, dtype=torch.float64).index_add_(0, inv, d * d) / (cnt - 1.0).clamp_min(1.0)
    adv = d / (var.sqrt()[inv] + eps)
    adv = torch.where(cnt[inv] < 2, x, adv) * v
    return adv.to(scores.dtype)


def gae_time_loop(rewards, values, mask, gamma=1.0, lam=1.0):
    """GAE the way trainers commonly write it: a Python loop over time with
    batched tensor ops per step (masked tokens carry V and A through), then
    masked whitening. The benchmark baseline of the reverse-scan kernel."""
    B, T = rewards.shape
    next_v = torch.zeros(B, dtype=rewards.dtype)
    last = torch.zeros(B, dtype=rewards.dtype)
    adv = torch.empty_like(rewards)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        a = delta + gamma * lam * last
        next_v = values[:, t] * m + (1 - m) * next_v
        last = a * m + (1 - m) * last
        adv[:, t] = last
    ret = (adv + values) * mask
    n = mask.sum()
    mean = (adv * mask).sum() / n
    var = (((adv - mean) * mask) ** 2).sum() / (n - 1)
    return (adv - mean) * torch.rsqrt(var + 1e-8) * mask, ret


def optimal_token_baseline_advantages(rewards, mask, index, old_logprobs, sum_p2, importance_weights=None,
                                      zero_tail=True, align="position", eps=1e-8):
    """Per-group loops in float64: ``B_t = sum_g G W m / (sum_g W m + eps)``, ``A = (G - B) m``;
    ``align="response"``: the sums run over the k-th valid token of each non-empty response."""
    if align == "response":
        m = mask.double()
        B, T = m.shape
        pos = [[t for t in range(T) if m[i, t] > 0] for i in range(B)]
        packed = lambda x: torch.stack([torch.cat([x[i, pos[i]], x.new_zeros(T - len(pos[i]))])  # noqa: E731
                                        for i in range(B)])
        counts = torch.tensor([[1.0] * len(pos[i]) + [0.0] * (T - len(pos[i])) for i in range(B)],
                              dtype=torch.float64)
        keep = [i for i in range(B) if pos[i]]
        iw = None if importance_weights is None else packed(importance_weights.double())
        # W and G are prefix / suffix sums over valid tokens: packing first gives the same values
        a, g = optimal_token_baseline_advantages(
            packed(rewards.double())[keep], counts[keep], [_keys(index, None, None)[i] for i in keep],
            packed(old_logprobs.double())[keep], packed(sum_p2.double())[keep], iw if iw is None else iw[keep],
            zero_tail, "position", eps)
        adv = torch.zeros(B, T, dtype=torch.float64)
        _, ret = optimal_token_baseline_advantages(rewards, mask, list(range(B)), old_logprobs, sum_p2,
                                                   importance_weights, False, "position", eps)
        for n, i in enumerate(keep):
            adv[i, pos[i]] = a[n, :len(pos[i])]
        return adv, ret
    r, m = rewards.double(), mask.double()
    B, T = r.shape
    G = torch.zeros_like(r)
    for i in range(B):
        acc = 0.0
        for t in reversed(range(T)):
            acc += float(r[i, t] * m[i, t])
            G[i, t] = acc
    w = 1.0 - 2.0 * torch.exp(old_logprobs.double()) + sum_p2.double()
    if importance_weights is not None:
        w = w * importance_weights.double() ** 2
    W = torch.zeros_like(r)
    for i in range(B):
        acc = 0.0
        for t in range(T):
            acc += float(w[i, t] * m[i, t])
            W[i, t] = acc
    groups = defaultdict(list)
    for i, k in enumerate(_keys(index, None, None)):
        groups[k].append(i)
    base = torch.zeros_like(r)
    for rows in groups.values():
        if len(rows) < 2:
            continue
        for t in range(T):
            num = sum(float(G[j, t] * W[j, t] * m[j, t]) for j in rows)
            den = sum(float(W[j, t] * m[j, t]) for j in rows) + eps
            for j in rows:
                base[j, t] = num / den
        lengths = [float(m[j].sum()) for j in rows]
        top = max(lengths)
        if zero_tail and lengths.count(top) == 1:
            second = max(x for x in lengths if x < top)
            base[rows[lengths.index(top)], int(second):] = 0.0
    return (G - base) * m, G
