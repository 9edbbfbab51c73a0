"""OTPrune: distribution-aligned visual token pruning via optimal transport.

Reference: "OTPrune: Distribution-Aligned Visual Token Pruning via Optimal Transport" (2026).
Pruning is cast as matching the kept tokens' distribution to the full set's under the
2-Wasserstein distance; the objective is relaxed to the monotone submodular
`log det(I + gamma * S S^T)[A, A]`, with S the token-token interaction of the
column-normalised features, and maximised greedily (1 - 1/e guarantee).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from otprune.methods._greedy import greedy_logdet, greedy_logdet_gram, on_host
from otprune.methods._numerics import max_abs, one_thread, pow2_scale
from otprune.methods.base import TokenSelector, check_finite, mask_beyond_k, param, valid_mask


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
    return column_stats(features, chunk, keys=False)[0]


def column_stats(features: Tensor, chunk: int = 64, keys: bool = True) -> tuple[Tensor, Tensor | None]:
    """One pass over features: (B, N, D) -> (the squared L2 norm of every dimension over the
    tokens: (B, 1, D), every token's `row_keys`: (B, N) or None when not asked for).

    Chunk by chunk of tokens: each chunk is read from memory once and then from cache (the
    squares go through one reused buffer into small GEMVs; no (B, N, D) temporary). The pass is
    bound by memory, not arithmetic: its small ops run on one intra-op thread (`one_thread`), so
    a busy CPU does not make each of them wait for a descheduled thread.
    """
    with one_thread(features.device):
        return _column_stats(features, chunk, keys)


def _column_stats(features: Tensor, chunk: int, keys: bool) -> tuple[Tensor, Tensor | None]:
    bsz, n, dim = features.shape
    chunk = min(chunk, n)
    acc = features.new_zeros(bsz, 1, dim)
    ones = features.new_ones(bsz, 1, chunk)
    traced = torch.compiler.is_compiling()  # dynamo refuses `out=` views that are not contiguous
    buf = None if traced else features.new_empty(bsz, chunk, dim)
    key_parts = []
    for lo in range(0, n, chunk):
        part = features[:, lo : lo + chunk]
        rows = part.shape[1]
        squares = torch.mul(part, part) if traced else torch.mul(part, part, out=buf[:, :rows])  # (B, rows, D)
        acc = torch.baddbmm(acc, ones[:, :, :rows], squares) if traced else acc.baddbmm_(ones[:, :, :rows], squares)
        if keys:
            key_parts.append(_halves_bit_sums(part))
    if not keys:
        return acc, None
    high, low = (torch.cat(halves, dim=1) for halves in zip(*key_parts, strict=True))
    return acc, _join_keys(high, low)


def column_scales(features: Tensor) -> Tensor:
    """(B, 1, D): 1 / ||X[:, c]||^2 per dimension c; 0 for an all-zero dimension (no NaN)."""
    return _reciprocal(column_sq_norms(features))


def _reciprocal(sq: Tensor) -> Tensor:
    return torch.where(sq > 0, sq.reciprocal(), torch.zeros_like(sq))


def column_weights(features: Tensor, sq: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(X, w) with S = Xn Xn^T = X diag(w) X^T, for features: (B, N, D) (padding rows zero).

    w: (B, 1, D) = 1 / ||X[:, c]||^2 (0 for an all-zero dimension). X is `features` itself when
    every dimension's squared norm lies in [2^-59, 2^59] (fp32; fp64 [2^-507, 2^507]): its squares
    and products then stay far from overflow and underflow, and no copy is made. Otherwise (also
    for an all-zero dimension, which cannot be told from one whose squares underflowed) X is
    `column_prescaled(features)`. The two give the same S bit for bit: a power of two p on a column
    scales its w by exactly 1 / p^2, so every product X[i, c] w[c] X[j, c] is the same number, as
    long as no value of a column is some 2^90 times smaller than its largest (subnormal).
    One host read decides (none under `torch.compile`, which always rescales). `sq`: the
    features' `column_sq_norms` if already computed.
    """
    sq = column_sq_norms(features) if sq is None else sq
    if not torch.compiler.is_compiling():
        bound = 2.0 ** (math.floor(math.log2(torch.finfo(sq.dtype).max)) // 2 - 4)
        if bool(((sq >= 1.0 / bound) & (sq <= bound)).all()):
            if features.data_ptr() % 64:  # read from where a fresh tensor starts, as a sample alone would be
                features = features.clone()
            return features, _reciprocal(sq)
    features = column_prescaled(features)
    return features, column_scales(features)


def normalise_columns(features: Tensor) -> Tensor:
    """features: (B, N, D) -> every dimension scaled to unit L2 norm over the N tokens.

    Padding rows must be zero: they then add nothing to the norms. An all-zero dimension
    stays zero instead of turning into NaN. Any magnitude works (`column_weights`).
    """
    features, weights = column_weights(features)
    return features * weights.sqrt()


def symmetric_gram(x: Tensor, blocks: int | None = None, scale: Tensor | None = None) -> Tensor:
    """x: (B, N, D) -> x diag(scale) x^T: (B, N, N), computing only the block lower triangle.

    Row block [lo:hi] gets columns [0:hi] from one GEMM written straight into the result;
    the blocks cost (blocks + 1) / (2 * blocks) of one full product. Every entry above the
    diagonal, including those inside the diagonal blocks, is then overwritten by its mirror
    below the diagonal, so the result is exactly symmetric whatever the BLAS's summation order.
    `scale`: (B, 1, D) weights, applied to each row block through one reused buffer (no scaled
    copy of the whole x). `blocks`: default one per ~144 rows, at most 8 (thinner GEMMs lose
    more to packing than the triangle saves).
    """
    bsz, n, dim = x.shape
    blocks = max(1, min(blocks or 8, n // 144 if blocks is None else n // 128))
    edges = [round(i * n / blocks) for i in range(blocks + 1)]
    spans = list(zip(edges[:-1], edges[1:], strict=True))
    gram = x.new_empty(bsz, n, n)
    widest = max(hi - lo for lo, hi in spans)
    traced = torch.compiler.is_compiling()  # dynamo refuses `out=` views that are not contiguous: plain ops
    buf = None if scale is None or traced else x.new_empty(bsz, widest, dim)
    for lo, hi in spans:
        if scale is None:
            left = x[:, lo:hi]
        else:
            left = x[:, lo:hi] * scale if traced else torch.mul(x[:, lo:hi], scale, out=buf[:, : hi - lo])
        if traced:
            gram[:, lo:hi, :hi] = torch.bmm(left, x[:, :hi].transpose(1, 2))
        else:
            torch.bmm(left, x[:, :hi].transpose(1, 2), out=gram[:, lo:hi, :hi])  # (B, hi - lo, hi)
    upper = torch.ones(widest, widest, dtype=torch.bool, device=x.device).triu_(1)  # strict upper triangle
    with one_thread(x.device):  # many small copies: one thread (see `column_stats`)
        for lo, hi in spans:
            if lo > 0:
                gram[:, :lo, lo:hi] = gram[:, lo:hi, :lo].transpose(1, 2)
            block = gram[:, lo:hi, lo:hi]  # a GEMM result: symmetric only up to rounding
            mask = upper[: hi - lo, : hi - lo]
            block.copy_(torch.where(mask, block.transpose(1, 2), block))
    return gram


def interaction(features: Tensor, gamma: float = 1.0) -> Tensor:
    """sqrt(gamma) * S, S = Xn Xn^T: (B, N, N), Xn the column-normalised features: (B, N, D)
    (padding rows zero), exactly symmetric.

    Xn is never formed: S = X diag(w) X^T (`column_weights`), with sqrt(gamma) folded into w.
    This product is the method's cost floor; exploiting the symmetry of S costs about 0.6-0.85
    of one full product.
    """
    return _interaction(features, gamma)[0]


def _interaction(features: Tensor, gamma: float, keys: bool = False) -> tuple[Tensor, Tensor | None]:
    """(`interaction`, the features' `row_keys` from the same pass over them, or None)."""
    sq, row_key = column_stats(features, keys=keys)
    scaled, weights = column_weights(features, sq)
    if scaled is not features and not torch.compiler.is_compiling():  # sq out of range: maybe a NaN or Inf
        if not bool(torch.isfinite(sq).all()):
            check_finite(features)
    features = scaled
    if gamma != 1.0:
        weights = weights * math.sqrt(gamma)
    return symmetric_gram(features, scale=weights), row_key


def row_keys(features: Tensor) -> Tensor:
    """(B, N) int64 fingerprints of the tokens' exact bit patterns up to sign: equal rows, and
    rows that are exact negations of each other, get equal keys.

    The wrapping 32-bit sums of the raw bits of each row's two halves, top bit dropped, so the
    key is exact integer arithmetic: it does not depend on the summation order, the device or the
    BLAS. Negating a value flips its sign bit, i.e. adds 2^31 modulo 2^32 to its word, so negating
    a row changes each half's sum by a multiple of 2^31, which only the dropped top bit sees.
    Different rows collide with probability about 2^-62 per pair (or when they differ by a
    permutation within a half, or only in signs; `duplicate_representatives` checks candidates
    element-wise).
    """
    return _join_keys(*_halves_bit_sums(features))


def _halves_bit_sums(features: Tensor) -> tuple[Tensor, Tensor]:
    """(B, N) int32 each: the wrapping sums of the raw bits of each row's first and second half,
    top bit cleared (blind to the values' signs as a whole: `row_keys`)."""
    bits = features.contiguous().view(torch.int32)  # (B, N, D) for fp32, (B, N, 2D) for fp64
    half = bits.shape[-1] // 2
    low31 = 0x7FFFFFFF
    return bits[..., :half].sum(-1, dtype=torch.int32) & low31, bits[..., half:].sum(-1, dtype=torch.int32) & low31


def _join_keys(high: Tensor, low: Tensor) -> Tensor:
    return (high.to(torch.int64) << 32) | (low.to(torch.int64) & 0xFFFFFFFF)


def duplicate_representatives(features: Tensor) -> Tensor:
    """(B, N) long: for every token, the lowest index of a token with exactly the same features,
    or exactly their negation (its "copy", up to sign).

    (`representatives` also gives the sign of each copy and says whether any copy was found.)

    Exact duplicates have identical rows of S and of L in exact arithmetic, and an exact negation
    -x of x has S's row negated, hence L's row negated off the diagonal (L[-x, -x] = L[x, x]):
    flipping a token's sign maps L[A, A] to D L[A, A] D with D = diag(+-1), which has the same
    determinant, so a copy and a negation tie in every greedy step in exact arithmetic. A GEMM
    may round them differently (they sit at different positions in the product). The kernel is
    therefore read through this map (`L[i, j] := sign[i] sign[j] L[rep[i], rep[j]]` off the
    identity), so copies and negations get kernel values equal up to an exact sign and an exact
    tie goes to the lowest index, on every BLAS, as in the official picks.

    Candidates are the tokens with equal `row_keys` (a stable sort groups them, lowest index
    first); they are then compared element by element with the group's first token and its
    negation, so different tokens are never merged.
    The comparison runs only when some candidate exists (one host read, before any selection
    loop; under `torch.compile` a `torch.cond`, so the method still compiles as one graph). A token whose key collides
    with a different, lower-indexed token keeps its own index: still exact, only not merged.

    Args:
        features: (B, N, D), the tokens (padding rows zero: they map to the first zero row).
    """
    return representatives(features)[0]


def representatives(
    features: Tensor, valid: Tensor | None = None, keys: Tensor | None = None
) -> tuple[Tensor, Tensor, bool | None]:
    """(`duplicate_representatives` rep: (B, N) long; sign: (B, N) in the features' dtype, -1 where
    a token is the negation of its representative, else 1; whether some token has a candidate copy,
    None under `torch.compile`, where that is not read on the host). `valid`: (B, N) bool; padding
    rows (False) keep their own index and are no one's copy. `keys`: the features' `row_keys` if
    already computed."""
    bsz, n, dim = features.shape
    keys, order = torch.sort(row_keys(features) if keys is None else keys, dim=-1, stable=True)  # (B, N) each, ascending index within a key
    starts = torch.ones_like(keys, dtype=torch.bool)
    starts[:, 1:] = keys[:, 1:] != keys[:, :-1]
    group = starts.cumsum(-1) - 1  # (B, N): group of each sorted position
    group_first = torch.zeros_like(order).scatter_add_(1, group, torch.where(starts, order, 0))
    first = torch.empty_like(order).scatter_(1, order, group_first.gather(1, group))  # (B, N)
    own = torch.arange(n, device=features.device).expand_as(first)
    if valid is not None:  # padding follows the real tokens, so a real token never maps to it
        first = torch.where(valid, first, own)

    def checked(first: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
        offsets = torch.arange(bsz, device=features.device)[:, None] * n
        rows = features.reshape(bsz * n, dim)
        copies = rows.index_select(0, (first + offsets).view(-1))  # (B * N, D)
        same = (copies == rows).all(dim=-1).view(bsz, n)
        negated = (copies == -rows).all(dim=-1).view(bsz, n) & ~same  # (a zero row is a copy, sign 1)
        sign = torch.where(negated, -1.0, 1.0).to(features.dtype)
        return torch.where(same | negated, first, own), sign

    def identity(first: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
        return first.clone(), torch.ones(first.shape, dtype=features.dtype, device=features.device)

    if torch.compiler.is_compiling():  # one graph: the comparison as a traced conditional
        rep, sign = torch.cond((first != own).any(), checked, identity, (first, features))
        return rep, sign, None
    candidates = bool((first != own).any())
    return *(checked if candidates else identity)(first, features), candidates


@dataclasses.dataclass
class OTPrune(TokenSelector):
    """Greedy log-det selection on L = I + gamma * S S^T (docs/ALGORITHM.md section 1).

    Steps per image: normalise each embedding dimension over the tokens to unit L2 norm;
    S = Xn Xn^T; L = I + gamma * S S^T; greedily add the token with the largest Cholesky
    residual d2 (the log-det gain is log d2). Since L - I is PSD, every d2 stays >= 1, so K is
    always reached with no fallback.

    Both S and S S^T = S^2 are symmetric, so each is formed from its block lower triangle
    (`symmetric_gram`, exactly symmetric); the greedy then reads diag(L) and K rows of L.
    Exact duplicate tokens, and exact negations (S S^T is sign-blind), read the same kernel
    values up to an exact sign (`duplicate_representatives`), so every such tie is exact and
    goes to the lowest index, as in the official code.
    """

    gamma: float = param(0.01, env="OTPRUNE_GAMMA", tag="g", label="γ", doc="a number > 0, e.g. 0.01")
    name = "otprune"
    display_name = "OTPrune"
    checks_finite = True  # `interaction`: the column norms' pass sees every NaN or Inf
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

    def gram(self, features: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, bool | None]:
        """gamma * S S^T: (B, N, N), exactly symmetric; the duplicate map rep: (B, N) and its
        signs: (B, N); and whether any token has a candidate copy (`representatives`; False: rep
        is the identity, every sign 1).

        S S^T = S^2 is formed from sqrt(gamma) * S (`interaction`), so no pass scales it by gamma.
        The kernel is L[i, j] = [i == j] + sign[i] sign[j] G[rep[i], rep[j]] with G the first output.
        """
        s, rep, sign, copies = self._interaction_and_copies(features, valid)
        return symmetric_gram(s), rep, sign, copies

    def _interaction_and_copies(
        self, features: Tensor, valid: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, bool | None]:
        """sqrt(gamma) * S: (B, N, N), and `representatives` (row keys from the same pass)."""
        self.check_features(features)
        s, keys = _interaction(features, self.gamma, keys=True)
        return s, *representatives(features, valid, keys)

    def kernel(self, features: Tensor, valid: Tensor | None = None) -> Tensor:
        """L = I + gamma * S S^T: (B, N, N) from features: (B, N, D) (padding rows zero).

        Exactly symmetric; exact duplicate tokens have bit-identical rows (off the identity)
        and diagonal values, exact negations rows negated exactly: the rows and columns of every
        copy are overwritten by its representative's, times its sign (`duplicate_representatives`).
        """
        gram, rep, sign, copies = self.gram(features, valid)
        if copies is None:  # traced: every entry through the map, without reading it on the host
            gram = torch.gather(gram, 1, rep[:, :, None].expand_as(gram))  # G[rep[i], :]
            gram = torch.gather(gram, 2, rep[:, None, :].expand_as(gram))  # G[rep[i], rep[j]]
            gram = gram * (sign[:, :, None] * sign[:, None, :])
        elif copies:
            read_through(gram, rep, sign)
        gram.diagonal(dim1=1, dim2=2).add_(1.0)
        return gram

    def select(self, features: Tensor, lengths: Tensor, k: Tensor, k_max: int) -> Tensor:
        valid = valid_mask(lengths, features.shape[1])  # (B, N)
        if not (on_host(features) and features.shape[1] <= ROWS_FROM_S):
            return mask_beyond_k(greedy_logdet(self.kernel(features, valid), valid, k_max), k)
        # The host greedy reads L = I + S' S'^T (S' = sqrt(gamma) S) one row per pick: K
        # products S' S'[j] from a cache-resident S' instead of the N^3 product S' S'^T.
        s, rep, sign, copies = self._interaction_and_copies(features, valid)  # (B, N, N), (B, N), (B, N)
        copy_map = (rep, sign) if copies else None  # copies: L read through rep, with the signs
        return mask_beyond_k(greedy_logdet_gram(s, valid, k_max, copy_map), k)


ROWS_FROM_S = 2048
"""Up to this many tokens (S: 16 MB in fp32, within a CPU's cache) the CPU greedy computes the K
kernel rows it reads from S; beyond it, from S S^T formed by one GEMM (S no longer stays in
cache, and K memory-bound products cost more than the GEMM)."""


def read_through(gram: Tensor, rep: Tensor, sign: Tensor | None = None) -> None:
    """gram[b, i, j] := sign[b, i] sign[b, j] gram[b, rep[b, i], rep[b, j]] in place, for gram:
    (B, N, N), rep: (B, N), sign: (B, N) of +-1 (None: all 1).

    Only the rows and columns of tokens with rep[i] != i are written (a representative is its own
    representative, sign 1): rows first, then columns, which also sets gram[i, i] =
    gram[rep[i], rep[i]] (the sign squared). Multiplying by -1 is exact.
    """
    own = torch.arange(rep.shape[1], device=rep.device)
    batch, index = (rep != own).nonzero(as_tuple=True)  # (M,) each: the copies
    source = rep[batch, index]
    flip = None if sign is None else sign[batch, index][:, None]  # (M, 1)
    rows = gram[batch, source]
    gram[batch, index] = rows if flip is None else rows * flip  # (M, N) rows
    cols = gram[batch, :, source]
    gram[batch, :, index] = cols if flip is None else cols * flip  # (M, N) columns


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
