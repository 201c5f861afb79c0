"""A straightforward transcription of the UCE + RECE equations (per layer, per row), to check the engine against."""

import torch


def _solve_right(m1, m2):
    return torch.linalg.solve(m2.T, m1.T).T


def uce_layer(W, pairs, preserve_rows, lamb, s_e, s_p, technique="replace"):
    """M1 = λW, M2 = λI; erase pairs and preserved rows add outer products; W' = M1 M2⁻¹."""
    d = W.shape[1]
    M1 = lamb * W.clone()
    M2 = lamb * torch.eye(d, dtype=torch.float64)
    for C, Cstar in pairs:
        if technique == "tensor":
            o = C @ W.T
            u = o / o.norm()
            v = Cstar @ W.T
            values = v - (u * v).sum() * u
        else:
            values = Cstar @ W.T
        for c, v in zip(C, values):
            M1 += s_e * torch.outer(v, c)
            M2 += s_e * torch.outer(c, c)
    for e in preserve_rows:
        M1 += s_p * torch.outer(W @ e, e)
        M2 += s_p * torch.outer(e, e)
    return _solve_right(M1, M2)


def reference_erase(
    kv,
    encode,
    counts,
    concepts,
    target=" ",
    preserve=(),
    method="rece",
    epochs=1,
    r=0.1,
    lamb=0.1,
    s_e=1.0,
    s_p=0.1,
    uce_lamb=0.5,
    uce_s_e=1.0,
    uce_s_p=None,
    technique="replace",
    edited=None,
    standard_text=None,
    masked=False,
    end_rows=1,
    whole=False,
    pairing="position",
    ids=None,
    uce_rows="last",
):
    """Return the final weights {name: W} following the issue's procedure literally.

    `masked`: the model masks padding rows (PixArt): a text is its first counts(text) rows, UCE's slice runs from the
    concept's last word to its last attended row (`end_rows` rows follow the last word: EOS), and the target supplies
    the rows at the same offsets. `whole`: a pooled space, whose one row is paired as it is. `pairing` (masked only):
    RECE's c′ row i to the target's row i ("position"), from the last words on over the target's attended rows
    ("attended"), or row i to row i for the tokens (`ids(text)`: attended token ids) no preserved text has
    ("unshared"). `uce_rows="unshared"` (masked only): UCE also maps the concept's rows of those tokens before its
    slice, each to the target's row at the same position (its last word row where the target is shorter)."""
    rows = (lambda t: encode(t)[: counts(t)]) if masked else encode
    W0 = {n: w.to(torch.float64) for n, w in kv.items()}
    W = dict(W0)
    edited = list(kv) if edited is None else edited
    uce_preserve = [""] + list(preserve)
    uce_s_p = max(0.1, 1 / len(uce_preserve)) if uce_s_p is None else uce_s_p
    # UCE stage
    pairs = []
    for x in concepts:
        Ex, Ey = encode(x), encode(target)
        if whole:  # a pooled space: every row
            pairs.append((Ex, Ey))
        elif masked:
            ix, iy = max(counts(x) - 1 - end_rows, 0), max(counts(target) - 1 - end_rows, 0)
            n = counts(x) - ix
            before = []
            if uce_rows == "unshared":
                shared = set(ids(" ")).union(*(ids(p) for p in preserve))
                before = [i for i, token in enumerate(ids(x)) if token not in shared and i < ix]
            pairs.append((
                torch.cat([Ex[before], Ex[ix : ix + n]]),
                torch.cat([Ey[[min(i, iy) for i in before]], Ey[iy : iy + n]]),
            ))  # fmt: skip
        else:
            ix, iy = max(counts(x) - 2, 0), max(counts(target) - 2, 0)
            far, length = max(ix, iy), Ex.shape[0]
            pairs.append((Ex[ix : length - (far - ix)], Ey[iy : length - (far - iy)]))
    preserve_rows = torch.cat([rows(p) for p in uce_preserve])
    for n in edited:
        W[n] = uce_layer(W[n], pairs, preserve_rows, uce_lamb, uce_s_e, uce_s_p, technique)
    if method != "rece":
        return W
    rece_preserve = torch.cat([rows(" ") for _ in concepts] + [rows(p) for p in preserve])

    def reference_pair(cp, x):
        Ey = encode(target)
        if masked and pairing == "attended":
            ix, iy = max(counts(x) - 1 - end_rows, 0), max(counts(target) - 1 - end_rows, 0)
            n = min(counts(x) - ix, counts(target) - iy)
            return cp[ix : ix + n], Ey[iy : iy + n]
        if masked and pairing == "unshared":
            shared = set(ids(" ")).union(*(ids(p) for p in preserve))
            keep = [i for i, token in enumerate(ids(x)) if token not in shared]
            return cp[keep], Ey[keep]
        return cp, Ey[: cp.shape[0]]

    for _ in range(epochs):
        d = next(iter(W.values())).shape[1]
        A = r * torch.eye(d, dtype=torch.float64)
        B = torch.zeros(d, d, dtype=torch.float64)
        for n in W:
            A += W[n].T @ W[n]
            B += W[n].T @ W0[n]
        derived = []
        for x in concepts:
            c = rows(x)
            if standard_text is None:
                derived.append(c @ torch.linalg.solve(A, B).T)
            else:
                derived.append(torch.linalg.solve(A, r * encode(standard_text).T + B @ c.T).T)
        rpairs = [reference_pair(cp, x) for cp, x in zip(derived, concepts)]
        for n in edited:
            W[n] = uce_layer(W[n], rpairs, rece_preserve, lamb, s_e, s_p, technique)
    return W


def best_reachable_residual(edit, base, names, rows):
    """min over every embedding x of ‖W′x − W⁰c‖ / ‖W⁰c‖ over the layers `names` (least squares, float64 weights)."""
    w0 = torch.cat([base.kv[n].to(torch.float64) for n in names])
    edited = torch.cat([base.kv[n].to(torch.float64) + edit.delta64(n, base.kv[n]) for n in names])
    wanted = w0 @ rows.T
    x = torch.linalg.lstsq(edited, wanted).solution
    return float(torch.linalg.norm(edited @ x - wanted) / torch.linalg.norm(wanted))
