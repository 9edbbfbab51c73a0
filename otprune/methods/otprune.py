"""OTPrune: distribution-aligned visual token pruning via optimal transport.

Reference: "OTPrune: Distribution-Aligned Visual Token Pruning via Optimal Transport" (2026).
Pruning is cast as matching the kept tokens' distribution to the full set's under the
2-Wasserstein distance; the objective is relaxed to the monotone submodular
`log det(I + gamma * S S^T)[A, A]`, with S the token-token interaction of the
column-normalised features, and maximised greedily (1 - 1/e guarantee).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from otprune.methods._greedy import greedy_logdet
from otprune.methods._numerics import max_abs, pow2_scale
from otprune.methods.base import TokenSelector, flat_rows, param, valid_mask


def column_prescaled(features: Tensor) -> Tensor:
    """features: (B, N, D) -> a copy with every dimension scaled by an exact power of two so that
    its largest |value| over the tokens lies in [0.5, 1) (all-zero dimensions stay zero).

    The column normalisation removes any per-dimension scale, so this changes nothing in exact
    arithmetic, and nothing at all in fp32 (powers of two scale exactly): it only keeps the
    squares and products that follow far from fp32 overflow and underflow, so features of any
    magnitude (1e-30 .. 1e30) give the same S (`otprune.methods._numerics`).
    """
    return features * pow2_scale(max_abs(features, dim=1))


def column_sq_norms(features: Tensor, chunk: int = 64) -> Tensor:
    """features: (B, N, D) -> (B, 1, D), the squared L2 norm of every dimension over the tokens.

    Summed chunk by chunk of tokens as small GEMVs through one reused buffer, so no
    (B, N, D) temporary is allocated.
    """
    bsz, n, dim = features.shape
    chunk = min(chunk, n)
    acc = features.new_zeros(bsz, 1, dim)
    ones = features.new_ones(bsz, 1, chunk)
    buf = features.new_empty(bsz, chunk, dim)
    for lo in range(0, n, chunk):
        part = features[:, lo : lo + chunk]
        rows = part.shape[1]
        acc.baddbmm_(ones[:, :, :rows], torch.mul(part, part, out=buf[:, :rows]))
    return acc


def column_scales(features: Tensor) -> Tensor:
    """(B, 1, D): 1 / ||X[:, c]||^2 per dimension c; 0 for an all-zero dimension (no NaN)."""
    sq = column_sq_norms(features)
    return torch.where(sq > 0, sq.reciprocal(), torch.zeros_like(sq))


def normalise_columns(features: Tensor) -> Tensor:
    """features: (B, N, D) -> every dimension scaled to unit L2 norm over the N tokens.

    Padding rows must be zero: they then add nothing to the norms. An all-zero dimension
    stays zero instead of turning into NaN. Any magnitude works (`column_prescaled`).
    """
    features = column_prescaled(features)
    return features * column_scales(features).sqrt()


def symmetric_gram(x: Tensor, blocks: int = 4, scale: Tensor | None = None) -> Tensor:
    """x: (B, N, D) -> x diag(scale) x^T: (B, N, N), computing only the block lower triangle.

    Row block [lo:hi] gets columns [0:hi] from one GEMM written straight into the result;
    the blocks cost (blocks + 1) / (2 * blocks) of one full product. Every entry above the
    diagonal, including those inside the diagonal blocks, is then overwritten by its mirror
    below the diagonal, so the result is exactly symmetric whatever the BLAS's summation order.
    `scale`: (B, 1, D) weights, applied to each row block through one reused buffer (no scaled
    copy of the whole x).
    """
    bsz, n, dim = x.shape
    blocks = max(1, min(blocks, n // 128))
    edges = [round(i * n / blocks) for i in range(blocks + 1)]
    gram = x.new_empty(bsz, n, n)
    widest = max(b - a for a, b in zip(edges[:-1], edges[1:], strict=True))
    buf = None if scale is None else x.new_empty(bsz, widest, dim)
    upper = torch.ones(widest, widest, dtype=torch.bool, device=x.device).triu_(1)  # strict upper triangle
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        left = x[:, lo:hi] if buf is None else torch.mul(x[:, lo:hi], scale, out=buf[:, : hi - lo])
        torch.bmm(left, x[:, :hi].transpose(1, 2), out=gram[:, lo:hi, :hi])  # (B, hi - lo, hi)
        if lo > 0:
            gram[:, :lo, lo:hi] = gram[:, lo:hi, :lo].transpose(1, 2)
        block = gram[:, lo:hi, lo:hi]  # a GEMM result: symmetric only up to rounding
        mask = upper[: hi - lo, : hi - lo]
        block.copy_(torch.where(mask, block.transpose(1, 2), block))
    return gram


def interaction(features: Tensor) -> Tensor:
    """S = Xn Xn^T: (B, N, N), Xn the column-normalised features: (B, N, D) (padding rows zero).

    Xn is never formed: S = X diag(1 / ||X[:, c]||^2) X^T, with X first rescaled exactly per
    dimension (`column_prescaled`). This product is the method's cost floor; exploiting the
    symmetry of S costs about 0.6-0.7 of one full product.
    """
    features = column_prescaled(features)
    return symmetric_gram(features, scale=column_scales(features))


def row_keys(features: Tensor) -> Tensor:
    """(B, N) int64 fingerprints of the tokens' exact bit patterns: equal rows, equal keys.

    The wrapping 32-bit sums of the raw bits of each row's two halves, so the key is exact
    integer arithmetic: it does not depend on the summation order, the device or the BLAS.
    Different rows collide with probability about 2^-64 per pair (or when they differ by a
    permutation within a half; `duplicate_representatives` checks candidates element-wise).
    """
    bits = features.contiguous().view(torch.int32)  # (B, N, D) for fp32, (B, N, 2D) for fp64
    half = bits.shape[-1] // 2
    low = bits[..., half:].sum(-1, dtype=torch.int32).to(torch.int64) & 0xFFFFFFFF
    high = bits[..., :half].sum(-1, dtype=torch.int32).to(torch.int64)
    return (high << 32) | low


def duplicate_representatives(features: Tensor) -> Tensor:
    """(B, N) long: for every token, the lowest index of a token with exactly the same features.

    (`representatives` also says whether any copy was found.)

    Exact duplicates have identical rows of S and of L in exact arithmetic, but a GEMM may round
    two copies differently (they sit at different positions in the product). The kernel is
    therefore read through this map (`L[i, j] := L[rep[i], rep[j]]` off the identity), so copies
    get bit-identical kernel values and an exact tie goes to the lowest index, on every BLAS.

    Candidates are the tokens with equal `row_keys` (a stable sort groups them, lowest index
    first); they are then compared element by element, so different tokens are never merged.
    The comparison runs only when some candidate exists (one host read, before any selection
    loop; under `torch.compile` a `torch.cond`, so the method still compiles as one graph). A token whose key collides
    with a different, lower-indexed token keeps its own index: still exact, only not merged.

    Args:
        features: (B, N, D), the tokens (padding rows zero: they map to the first zero row).
    """
    return representatives(features)[0]


def representatives(features: Tensor, valid: Tensor | None = None) -> tuple[Tensor, bool | None]:
    """`duplicate_representatives`, and whether some token has a candidate copy (None under
    `torch.compile`, where that is not read on the host). `valid`: (B, N) bool; padding rows
    (False) keep their own index and are no one's copy."""
    bsz, n, dim = features.shape
    keys, order = torch.sort(row_keys(features), dim=-1, stable=True)  # (B, N) each, ascending index within a key
    starts = torch.ones_like(keys, dtype=torch.bool)
    starts[:, 1:] = keys[:, 1:] != keys[:, :-1]
    group = starts.cumsum(-1) - 1  # (B, N): group of each sorted position
    group_first = torch.zeros_like(order).scatter_add_(1, group, torch.where(starts, order, 0))
    first = torch.empty_like(order).scatter_(1, order, group_first.gather(1, group))  # (B, N)
    own = torch.arange(n, device=features.device).expand_as(first)
    if valid is not None:  # padding follows the real tokens, so a real token never maps to it
        first = torch.where(valid, first, own)

    def checked(first: Tensor, features: Tensor) -> Tensor:
        offsets = torch.arange(bsz, device=features.device)[:, None] * n
        rows = features.reshape(bsz * n, dim)
        copies = rows.index_select(0, (first + offsets).view(-1))  # (B * N, D)
        same = (copies == rows).all(dim=-1).view(bsz, n)
        return torch.where(same, first, own)

    if torch.compiler.is_compiling():  # one graph: the comparison as a traced conditional
        return torch.cond((first != own).any(), checked, lambda first, features: first.clone(), (first, features)), None
    candidates = bool((first != own).any())
    return (checked(first, features) if candidates else first), candidates


@dataclasses.dataclass
class OTPrune(TokenSelector):
    """Greedy log-det selection on L = I + gamma * S S^T (docs/ALGORITHM.md section 1).

    Steps per image: normalise each embedding dimension over the tokens to unit L2 norm;
    S = Xn Xn^T; L = I + gamma * S S^T; greedily add the token with the largest Cholesky
    residual d2 (the log-det gain is log d2). Since L - I is PSD, every d2 stays >= 1, so K is
    always reached with no fallback.

    Both S and S S^T = S^2 are symmetric, so each is formed from its block lower triangle
    (`symmetric_gram`, exactly symmetric); the greedy then reads diag(L) and K rows of L.
    Exact duplicate tokens read the same kernel values (`duplicate_representatives`), so
    every tie is exact and goes to the lowest index, as in the official code.
    """

    gamma: float = param(0.01, env="OTPRUNE_GAMMA", tag="g", label="γ", doc="a number > 0, e.g. 0.01")
    name = "otprune"
    display_name = "OTPrune"
    table_rank = 100
    aliases = ("ours",)

    def __post_init__(self) -> None:
        if isinstance(self.gamma, bool) or not (isinstance(self.gamma, (int, float)) and self.gamma > 0):
            raise ValueError(f"OTPrune gamma={self.gamma!r}: must be a number > 0 (paper default 0.01)")
        check_gamma(self.gamma, 1, torch.float32)

    def check_features(self, features: Tensor) -> None:
        """gamma must keep the kernel representable in fp32 for these features' D (`check_gamma`;
        one bound for every input dtype, fp64 included)."""
        check_gamma(self.gamma, features.shape[-1])

    def official_order(self, picks: list[int]) -> list[int]:
        """The official OTPrune code's order: the iteration order of a Python set of the picks."""
        return official_order(picks)

    def gram(self, features: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor, bool | None]:
        """gamma * S S^T: (B, N, N), exactly symmetric; the duplicate map rep: (B, N); and whether
        any token has a candidate copy (`representatives`; False: rep is the identity).

        The kernel is L[i, j] = [i == j] + G[rep[i], rep[j]] with G the first output.
        """
        self.check_features(features)
        features = column_prescaled(features)  # exact: equal tokens stay equal, S is unchanged
        s = symmetric_gram(features, scale=column_scales(features))  # (B, N, N)
        rep, copies = representatives(features, valid)
        gram = symmetric_gram(s)
        gram.mul_(self.gamma)
        return gram, rep, copies

    def kernel(self, features: Tensor) -> Tensor:
        """L = I + gamma * S S^T: (B, N, N) from features: (B, N, D) (padding rows zero).

        Exactly symmetric; exact duplicate tokens have bit-identical rows (off the identity)
        and diagonal values. `select` never forms this matrix: it reads its diagonal and K rows.
        """
        gram, rep, _ = self.gram(features)
        rows = torch.gather(gram, 1, rep[:, :, None].expand_as(gram))  # G[rep[i], :]
        kernel = torch.gather(rows, 2, rep[:, None, :].expand_as(gram))  # G[rep[i], rep[j]]
        kernel.diagonal(dim1=1, dim2=2).add_(1.0)
        return kernel

    def select(self, features: Tensor, lengths: Tensor, k: Tensor, k_max: int) -> Tensor:
        valid = valid_mask(lengths, features.shape[1])  # (B, N)
        gram, rep, copies = self.gram(features, valid)  # (B, N, N), (B, N)
        bsz, n, _ = gram.shape
        if copies is False:  # no two tokens alike: L = I + G as it is, read in place
            gram.diagonal(dim1=1, dim2=2).add_(1.0)
            return greedy_logdet(gram.diagonal(dim1=1, dim2=2), flat_rows(gram), valid, k_max)
        diag = torch.gather(gram.diagonal(dim1=1, dim2=2), 1, rep) + 1.0  # (B, N): L[i, i]
        gram_rows = gram.view(bsz * n, n)
        offsets = torch.arange(bsz, device=gram.device)[:, None] * n  # (B, 1)
        rep_flat = (rep + offsets).view(-1)  # (B * N,)
        batch = torch.arange(bsz, device=gram.device)

        def kernel_row(j: Tensor, flat: Tensor) -> Tensor:  # L[b, j[b], :] read through rep
            row = torch.gather(gram_rows.index_select(0, rep_flat.index_select(0, flat)), 1, rep)  # (B, N)
            return row.index_put_((batch, j), row.new_ones(()), accumulate=True)  # + identity

        return greedy_logdet(diag, kernel_row, valid, k_max)


def gamma_limit(dim: int, dtype: torch.dtype = torch.float32) -> float:
    """The largest gamma for which L = I + gamma * S S^T is finite in `dtype` for D = dim features.

    Every dimension of Xn has unit norm, so trace(S) = ||Xn||_F^2 <= D and, by Cauchy-Schwarz,
    |S_ij| <= sqrt(S_ii S_jj) and |(S S^T)_ij| <= sqrt(S_ii S_jj) * trace(S) <= D^2 (equality for
    a single non-zero token). Hence every entry of L is at most 1 + gamma * D^2.
    """
    return (torch.finfo(dtype).max - 1.0) / float(dim) ** 2


def check_gamma(gamma: float, dim: int, dtype: torch.dtype = torch.float32) -> None:
    """ValueError naming OTPRUNE_GAMMA and the bound when gamma * D^2 would overflow `dtype`."""
    limit = gamma_limit(dim, dtype)
    if not gamma <= limit:  # also NaN
        what = "any features" if dim == 1 else f"D={dim} features"
        raise ValueError(
            f"gamma={gamma!r} (OTPRUNE_GAMMA) is too large for {what}: the kernel I + gamma * S S^T has entries "
            f"up to 1 + gamma * D^2, which must stay finite in {str(dtype).replace('torch.', '')}; "
            f"gamma must be <= {limit:.4g} (paper default 0.01, robust range 0.005..0.1)"
        )


def official_order(picks: list[int]) -> list[int]:
    """The order in which the official implementation hands kept tokens to the LLM.

    It collects the greedy picks in a Python `set` and iterates it, so tokens arrive in the
    set's hash-table order (e.g. 388, 389, 516, 383, ...), not in spatial order. Only for
    exact reproduction of the paper's runs (`OTPRUNE_ORDER=official`).
    """
    kept: set[int] = set()
    for index in picks:
        kept.add(int(index))
    return list(kept)
