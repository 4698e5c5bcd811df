"""Reference for docs/math.md#preference-losses: preference losses, sequence log-probs, and the logits path.

Written straight from the formulas, one ``if`` per loss, no shared helpers with the
product path; float64 in tests.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _ls(x):
    return torch.log(torch.sigmoid(x))


def sequence_logprobs(lp: Tensor, mask: Tensor, token_weights=None, ld_alpha=None):
    """(sum, mean, count) per row of a padded [S, T] batch; LD-DPO pairs halves."""
    m = mask.to(lp.dtype)
    w = m.clone()
    if token_weights is not None:
        w = w * token_weights.to(lp.dtype)
    count = m.sum(-1)
    if ld_alpha is not None:
        S = lp.shape[0]
        public = torch.minimum(count[: S // 2], count[S // 2:])
        public = torch.cat([public, public])
        for i in range(S):
            k = 0
            for t in range(lp.shape[1]):
                if m[i, t] > 0:
                    k += 1
                    if k > public[i]:
                        w[i, t] = w[i, t] * ld_alpha
    s = (torch.where(m > 0, lp, torch.zeros_like(lp)) * w).sum(-1)
    return s, s / torch.where(count > 0, count, torch.ones_like(count)), count


def packed_to_padded(x: Tensor, cu_seqlens, T: int):
    """[N] packed values -> [S, T] padded plus mask (loop over sequences, host side)."""
    cu = [int(v) for v in cu_seqlens]
    S = len(cu) - 1
    out = torch.zeros(S, T, dtype=x.dtype)
    mask = torch.zeros(S, T, dtype=torch.bool)
    for i in range(S):
        n = cu[i + 1] - cu[i]
        out[i, :n] = x[cu[i]:cu[i + 1]]
        mask[i, :n] = True
    return out, mask


def f_score(x, kind="reverse_kl", alpha=1.0):
    if kind == "reverse_kl":
        return x
    if kind == "forward_kl":  # f'(u) = 1 - 1/u
        return 1 - torch.exp(-x)
    if kind == "js_divergence":  # f'(u) = log(2u / (1 + u))
        u = torch.exp(x)
        return torch.log(2 * u / (1 + u))
    if kind == "alpha_divergence":  # f'(u) = (1 - u^-alpha) / alpha, alpha -> 0: log u
        if alpha == 0:
            return x
        return (1 - torch.exp(x) ** (-alpha)) / alpha
    raise ValueError(kind)


def one_loss(name, lc, lr, lc0, lr0, *, beta=0.1, eps=0.0, nc=None, nr=None, nll=None, f="reverse_kl",
             f_alpha=1.0, f_avg="log_ratio", cpo_alpha=1.0, gamma=0.5, alpha=0.25, tau=0.05, kto_kl=None, wd=1.0,
             wu=1.0):
    """Per-pair loss [B] of one docs/math.md#preference-losses row. ``f_avg="score"``: ipo / sigmoid_norm average f(x)
    instead of scoring the average x."""
    dc = f_score(lc - lc0, f, f_alpha)
    dr = f_score(lr - lr0, f, f_alpha)
    d = dc - dr

    def averaged():
        if f_avg == "score":
            return dc / nc - dr / nr
        return f_score((lc - lc0) / nc, f, f_alpha) - f_score((lr - lr0) / nr, f, f_alpha)

    def smooth(x):
        return -(1 - eps) * _ls(x) - eps * _ls(-x)

    if name == "sigmoid":
        return smooth(beta * d)
    if name == "robust":
        return (-(1 - eps) * _ls(beta * d) + eps * _ls(-beta * d)) / (1 - 2 * eps)
    if name == "hinge":
        return torch.clamp(1 - beta * d, min=0)
    if name == "ipo":
        return (averaged() - 1 / (2 * beta)) ** 2
    if name == "exo_pair":
        e = eps if eps > 0 else 1e-3
        q = torch.sigmoid(beta * d)
        return q * (torch.log(q) - math.log(1 - e)) + (1 - q) * (torch.log(1 - q) - math.log(e))
    if name == "nca_pair":
        return -_ls(beta * dc) - 0.5 * _ls(-beta * dc) - 0.5 * _ls(-beta * dr)
    if name == "bco_pair":
        return -_ls(beta * dc) - _ls(-beta * dr)
    if name == "sppo_hard":
        return (dc - 1 / (2 * beta)) ** 2 + (dr + 1 / (2 * beta)) ** 2
    if name == "aot":
        a = torch.sort(lc - lr).values - torch.sort(lc0 - lr0).values
        return smooth(beta * a)
    if name == "aot_unpaired":
        a = torch.sort(lc - lc0).values - torch.sort(lr - lr0).values
        return smooth(beta * a)
    if name == "apo_zero":
        return 1 - torch.sigmoid(beta * dc) + torch.sigmoid(beta * dr)
    if name == "apo_down":
        return torch.sigmoid(beta * dc) + 1 - torch.sigmoid(beta * d)
    if name == "discopop":
        w = torch.sigmoid(beta * d / tau)
        return (1 - w) * (-_ls(beta * d)) + w * torch.exp(-beta * d)
    if name == "sigmoid_norm":
        return smooth(beta * averaged())
    if name == "sft":
        return nll * torch.ones_like(lc)
    if name == "simpo":
        return smooth(beta * (lc / nc - lr / nr) - gamma)
    if name == "cpo":
        return smooth(beta * (lc - lr)) + cpo_alpha * nll
    if name == "orpo":
        pc, pr = torch.exp(lc / nc), torch.exp(lr / nr)
        log_odds = torch.log(pc / (1 - pc)) - torch.log(pr / (1 - pr))
        return nll - beta * _ls(log_odds)
    if name == "alphapo":
        pc, pr = torch.exp(lc / nc), torch.exp(lr / nr)
        rc, rr = (1 - pc ** (-alpha)) / alpha, (1 - pr ** (-alpha)) / alpha
        return smooth(beta * (rc - rr) - gamma)
    if name == "kto":
        kl = torch.cat([dc, dr]).mean() if kto_kl is None else kto_kl.mean()
        z0 = torch.clamp(kl, min=0).detach()
        losses = torch.cat([wd * (1 - torch.sigmoid(beta * (dc - z0))), wu * (1 - torch.sigmoid(beta * (z0 - dr)))])
        return losses.view(2, -1).mean(0)
    raise ValueError(name)


def preference_loss(lc, lr, lc0=None, lr0=None, *, loss_types=("sigmoid",), loss_weights=None, beta=0.1, eps=0.0,
                    smoothed=None, nc=None, nr=None, nll=None, rpo_alpha=None, pair_weights=None, **kw):
    """(loss, metrics) — sum of weighted per-pair means, optional pair weights and RPO term.
    ``smoothed``: the loss types that get ``eps`` (default all)."""
    if lc0 is None:
        lc0 = torch.zeros_like(lc)
        lr0 = torch.zeros_like(lr)
    if nc is not None:  # a response with no scored token counts as one token long
        nll = -lc.sum() / nc.sum().clamp(min=1) if nll is None else nll
        nc, nr = nc.clamp(min=1), nr.clamp(min=1)
    loss_weights = loss_weights or [1.0] * len(loss_types)
    per = sum(w * one_loss(t, lc, lr, lc0, lr0, beta=beta, eps=eps if smoothed is None or t in smoothed else 0.0,
                           nc=nc, nr=nr, nll=nll, **kw)
              for t, w in zip(loss_types, loss_weights))
    if pair_weights is not None:
        per = per * pair_weights
    loss = per.mean()
    if rpo_alpha is not None:
        loss = loss + rpo_alpha * nll
    rc, rr = beta * (lc - lc0).detach(), beta * (lr - lr0).detach()
    metrics = {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(),
               "rewards/accuracies": (rc > rr).to(lc.dtype).mean(), "rewards/margins": (rc - rr).mean(),
               "logps/chosen": lc.detach().mean(), "logps/rejected": lr.detach().mean()}
    if nll is not None:
        metrics["nll"] = nll.detach()
    if "orpo" in loss_types:
        pc, pr = torch.exp(lc / nc), torch.exp(lr / nr)
        log_odds = (torch.log(pc / (1 - pc)) - torch.log(pr / (1 - pr))).detach()
        metrics["log_odds_ratio"] = _ls(log_odds).mean()
        metrics["log_odds_chosen"] = log_odds.mean()
    return loss, metrics


def unpaired_loss(lp, lp0, desirable, *, loss_type="kto", beta=0.1, wd=1.0, wu=1.0, kl=None):
    """(loss, metrics) of KTO / unpaired APO-zero: a Python loop over the responses."""
    x = lp - (torch.zeros_like(lp) if lp0 is None else lp0)
    if loss_type == "kto":
        z0 = torch.clamp((x.mean() if kl is None else kl.mean()), min=0).detach()
    else:
        z0 = torch.zeros((), dtype=lp.dtype)
    losses, rc, rr, lc, lr = [], [], [], [], []
    for i in range(lp.shape[0]):
        if bool(desirable[i]):
            li = 1 - torch.sigmoid(beta * (x[i] - z0)) if loss_type == "kto" else 1 - torch.sigmoid(beta * x[i])
            losses.append(wd * li)
            rc.append(beta * x[i].detach())
            lc.append(lp[i].detach())
        else:
            li = 1 - torch.sigmoid(beta * (z0 - x[i])) if loss_type == "kto" else torch.sigmoid(beta * x[i])
            losses.append(wu * li)
            rr.append(beta * x[i].detach())
            lr.append(lp[i].detach())
    nan = torch.tensor(float("nan"), dtype=lp.dtype)

    def mean(v):
        return torch.stack(v).mean() if v else nan

    m = {"kl": z0, "rewards/chosen": mean(rc), "rewards/rejected": mean(rr), "logps/chosen": mean(lc),
         "logps/rejected": mean(lr)}
    m["rewards/margins"] = m["rewards/chosen"] - m["rewards/rejected"]
    return torch.stack(losses).mean(), m


def token_logps_from_hidden(hidden, weight, labels, bias=None, ignore_index=-100, dtype=torch.float32):
    """Per-token log-probs via full logits (the path that builds [N, V])."""
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    logp = torch.log_softmax(logits, -1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, lp, torch.zeros_like(lp)), valid


def linear_preference_loss(hidden, weight, labels, *, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                           ignore_index=-100, loss_types=("sigmoid",), beta=0.1, dtype=torch.float32, **kw):
    """Chosen rows first, rejected second, in a [2B, T, H] batch: builds the logits."""
    lp, valid = token_logps_from_hidden(hidden, weight, labels, bias, ignore_index, dtype)
    s, _, n = sequence_logprobs(lp, valid)
    B = s.shape[0] // 2
    lc0 = lr0 = None
    if ref_hidden is not None:
        with torch.no_grad():
            if ref_weight is None:  # same head as the policy
                ref_weight, ref_bias = weight, bias if ref_bias is None else ref_bias
            rlp, _ = token_logps_from_hidden(ref_hidden, ref_weight, labels, ref_bias, ignore_index, dtype)
            r, _, _ = sequence_logprobs(rlp, valid)
        lc0, lr0 = r[:B], r[B:]
    return preference_loss(s[:B], s[B:], lc0, lr0, loss_types=loss_types, beta=beta, nc=n[:B], nr=n[B:], **kw)
