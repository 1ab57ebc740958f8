"""The fused LM-head kernel: a causal LM's cross-entropy loss and κ of its head in one chunked pass over the rows.

From the head's input ``Φ`` (the counted positions only), its weight ``W`` and bias ``b``, one loop over row chunks
forms each chunk's logits ``Z = Φ Wᵀ + b`` once, takes one softmax, and from it the loss, κ and the gradients of
``L + λ·κ`` w.r.t. ``Φ``, ``W`` and ``b`` (the combined ``G = G_loss + λ·G_κ`` products), so that the penalty costs
no second pass over the vocabulary and no ``N × vocabulary`` tensor is kept beyond one chunk
(docs/mathematics.md#the-fused-lm-head-kernel). Pure torch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .heads import _logits, _mm, chunks, compute_dtype

VOCAB_TILE = 4096  # columns of S = V Wᵀ formed at a time when G_κ goes straight into G
FUSED_CHUNK_ELEMENTS = 1 << 23  # logits entries per chunk: 32 MiB in float32 (170 rows of a 49,152-token vocabulary)


class FusedHead(NamedTuple):
    """What :func:`fused_head_loss` returns.

    Attributes:
        loss: ``Σ_t u_t ℓ_t`` (0-d, compute dtype). Its gradient is that of ``loss + lam·κ``.
        kappa: ``Σ_{t<K} k_t ‖φ_t‖² c_t`` (0-d); differentiable (its own gradient) only with ``kappa_grad=True``.
        entropy: ``(N,)`` each row's predictive entropy (nats), or None (``metrics=False``). Detached.
        is_top1: ``(N,)`` bool, whether the label is the arg-max of the logits, or None. Detached.
    """

    loss: torch.Tensor
    kappa: torch.Tensor
    entropy: torch.Tensor | None
    is_top1: torch.Tensor | None


def fused_head_loss(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    loss_weights: torch.Tensor,
    kappa_weights: torch.Tensor,
    *,
    lam: float = 0.0,
    kappa_grad: bool = False,
    through_logits: bool = True,
    dft: bool = False,
    metrics: bool = False,
    chunk_rows: int,
    product_dtype: torch.dtype | None = None,
) -> FusedHead:
    """Cross-entropy of a linear head and its relative flatness κ, with the gradient of ``L + λ·κ``, in one pass.

    With ``z_t = W φ_t + b``, ``p_t = softmax(z_t)``, ``ℓ_t = logsumexp(z_t) − z_{t,y_t}``:

    * ``L = Σ_t u_t ω_t ℓ_t`` with ``u`` = ``loss_weights`` (the loss's normalisation: ``1/num_items_in_batch`` or
      ``1/N``) and ``ω_t = 1`` or, with ``dft=True``, ``ω_t = p_{t,y_t}`` held constant (DFT: each token's loss
      weighted by its own detached probability; TRL's ``loss_type="dft"``);
    * ``κ = Σ_{t<K} k_t ω_t ‖φ_t‖² c_t`` with ``c_t = Σ_s p_{t,s} ‖w_s‖² − ‖Wᵀ p_t‖²`` (κ's closed form for a head
      under a weighted sum of per-position cross-entropies, ``∇²_z(ω_t ℓ_t) = ω_t (diag p_t − p_t p_tᵀ)`` with
      ``ω_t`` constant) over the first ``K = len(kappa_weights)`` rows: a token sample puts its rows first and
      reweights them in ``k``.

    Args:
        features: ``Φ: (N, m)``, the head's inputs at the positions the loss counts (no ignored rows).
        weight: ``W: (d, m)``; tied or not, frozen or trained (a gradient is formed only if it requires one).
        bias: ``b: (d,)`` or None.
        labels: ``y: (N,)`` token ids in ``[0, d)``.
        loss_weights: ``u: (N,)``; not differentiated.
        kappa_weights: ``k: (K,)``, ``K ≤ N``, for the first ``K`` rows; not differentiated.
        lam: λ of the penalty whose gradient the returned ``loss`` carries (0: the loss's own gradient).
        kappa_grad: give ``kappa`` its own gradient too (kept apart from the loss's: two more ``N·d·m`` products,
            and a second copy of the gradients; for a step whose λ is not known before the pass).
        through_logits: False holds ``p`` constant in κ (``fam_hessian_grad="detached"``): κ's gradient then flows
            only through the explicit ``W`` factors, and ``Φ`` and ``b`` get none from it.
        dft: weight each row's loss and κ by its detached probability of the label, as above.
        metrics: also return each row's entropy and whether its label is the top-1 prediction.
        chunk_rows: rows of ``Φ`` whose ``(rows, d)`` logits are formed at a time.
        product_dtype: operand dtype of the ``N·d·m`` products (bf16 on a GPU); None: the compute dtype
            (``float32`` for half inputs, else the inputs' own). Softmax, the loss and κ stay in the compute dtype.

    Returns:
        :class:`FusedHead`. The gradients are formed in the forward pass, in the same chunk loop, when grad mode is
        on and an input requires one; the backward only scales them (in place, once: a second backward through the
        same graph is an error).

    Cost per row: ``Z = Φ Wᵀ``, ``G Wᵀ`` (for ``Φ``) and ``Gᵀ Φ`` (for a trained ``W``) as the loss alone costs, plus
    ``V = P W`` and ``S = V Wᵀ`` on the κ rows and ``(k ⊙ P)ᵀ V`` for a trained ``W``: 4 products for a frozen head
    (the loss alone: 2), 6 for a trained one (the loss alone: 3); one softmax.
    """
    if features.dim() != 2 or labels.shape != features.shape[:1] or loss_weights.shape != labels.shape:
        raise ValueError(
            f"features {tuple(features.shape)}, labels {tuple(labels.shape)} and loss_weights "
            f"{tuple(loss_weights.shape)} must be (N, m), (N,) and (N,): the counted positions only"
        )
    if kappa_weights.dim() != 1 or kappa_weights.shape[0] > features.shape[0]:
        raise ValueError(
            f"kappa_weights {tuple(kappa_weights.shape)} must be (K,) with K ≤ N = {features.shape[0]}: the weights "
            "of the first K rows (put a token sample first)"
        )
    eager = torch.is_grad_enabled()
    loss, kappa, entropy, top1 = _FusedHeadLoss.apply(
        features, weight, bias, labels, loss_weights, kappa_weights,
        float(lam), kappa_grad, through_logits, dft, metrics, chunk_rows, product_dtype, eager,
    )  # fmt: skip
    return FusedHead(loss, kappa, entropy if metrics else None, top1 if metrics else None)


class _FusedHeadLoss(torch.autograd.Function):
    # Per chunk, with P = softmax(Z), Y the one-hot labels, a_t = k_t ω_t ‖φ_t‖², r_s = ‖w_s‖², V = P W,
    # S = r − 2 V Wᵀ (so p_t·s_t = c_t − ‖v_t‖²) (docs/mathematics.md#the-fused-lm-head-kernel):
    #   G_loss = (u ⊙ ω) ⊙ (P − Y)                         ∂L/∂Z   (ω held constant)
    #   G_κ    = a ⊙ P ⊙ (S − (p·s) 1ᵀ)                      ∂κ/∂Z   (zero with through_logits=False)
    #   G      = G_loss + λ G_κ
    #   ∂/∂Φ = G W + 2λ (k ω c) ⊙ Φ      (the last from ‖φ_t‖²; on the κ rows, with through_logits)
    #   ∂/∂b = Σ_t G_t
    #   ∂/∂W = Gᵀ Φ + λ (2 diag(Σ_t a_t p_t) W − 2 (a ⊙ P)ᵀ V)      (through Z, then κ's explicit W factors)
    # With kappa_grad the same for κ alone (G_κ, λ = 1) is kept apart.

    @staticmethod
    def forward(
        ctx, features, weight, bias, labels, loss_weights, kappa_weights,
        lam, kappa_grad, through_logits, dft, metrics, chunk_rows, product_dtype, eager,
    ):  # fmt: skip
        need = ctx.needs_input_grad[:3] if eager else (False,) * 3
        need = (need[0], need[1], need[2] and bias is not None)
        kappa_grad = kappa_grad and any(need)
        args = (features, weight, bias, labels, loss_weights, kappa_weights)
        opts = dict(through_logits=through_logits, dft=dft, metrics=metrics, chunk_rows=chunk_rows,
                    product_dtype=product_dtype, need=need)  # fmt: skip
        loss, kappa, entropy, top1, grads, kgrads = _pass(*args, lam, kappa_grad, **opts)
        if (lam != 0 or kappa_grad) and not torch.isfinite(kappa):
            # κ overflowed, and so did G_κ (inside G): again with the loss's own gradient only, κ without one (its
            # value is dropped by FAMPenalty); one host synchronisation per pass, as counting the labels costs already
            loss, kappa, entropy, top1, grads, kgrads = _pass(*args, 0.0, False, **opts)
        ctx.grads = grads
        ctx.kgrads = kgrads
        ctx.dtypes = (features.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(entropy, top1)
        if kgrads is None:
            ctx.mark_non_differentiable(kappa)
        return loss, kappa, entropy, top1

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_kappa, _entropy, _top1):
        if ctx.grads is None:
            raise RuntimeError(
                "the fused LM-head kernel's backward ran a second time (retain_graph=True): its gradients, computed "
                "in the forward pass, are scaled in place and handed over the first time; run the forward again"
            )
        grads, kgrads, ctx.grads, ctx.kgrads = ctx.grads, ctx.kgrads, None, None
        out = grads.scaled(grad_loss)
        if kgrads is not None:
            for i, extra in enumerate(kgrads.scaled(grad_kappa)):
                if extra is not None:
                    out[i] = extra if out[i] is None else out[i].add_(extra)
        out = [None if g is None else g.to(t) for g, t in zip(out, ctx.dtypes)]
        return (*out, *(None,) * 11)


def _pass(features, weight, bias, labels, loss_weights, kappa_weights, lam, kappa_grad, *, through_logits, dft, metrics,
          chunk_rows, product_dtype, need):  # fmt: skip
    """One pass over the row chunks: ``(loss, κ, entropy, top-1, gradients of L + λκ, gradients of κ or None)``.

    One ``(rows, d)`` buffer per chunk: ``Z``, turned into ``P`` and then ``G`` in place, with ``S = r − 2 V Wᵀ``
    formed a vocabulary tile at a time into it; a second one (``S`` turned into ``G_κ``) only where κ needs a
    gradient of its own (``kappa_grad``). κ's explicit ``W`` terms are taken as ``Pᵀ (a ⊙ V)`` so that ``a ⊙ P``
    is never formed."""
    dtype = compute_dtype(weight.dtype)
    need_phi, need_w, need_b = need
    kphi, kb = need_phi and through_logits, need_b and through_logits
    n, k_rows = features.shape[0], kappa_weights.shape[0]
    with torch.autocast(features.device.type, enabled=False):
        w = weight.to(dtype)
        row_sq = torch.linalg.vector_norm(w, dim=-1).square()
        u = loss_weights.detach().to(dtype)
        kw = kappa_weights.detach().to(dtype)
        loss, kappa = w.new_zeros(()), w.new_zeros(())
        entropy = features.new_empty(n if metrics else 0, dtype=dtype)
        top1 = features.new_empty(n if metrics else 0, dtype=torch.bool)
        grads = _Grads(features, w, need_phi, need_w, need_b, product_dtype)  # of L + λκ
        kgrads = _Grads(features, w, kphi, need_w, kb, product_dtype, every_row=False) if kappa_grad else None
        # the objectives κ's gradient goes into, with its factor in each
        kappa_targets = [(t, f) for t, f in ((grads, lam), (kgrads, 1.0)) if t is not None and f != 0]
        for rows in chunks(n, chunk_rows):
            phi = features[rows].to(dtype)
            y = labels[rows]
            pick = torch.arange(y.shape[0], device=y.device)
            z = _logits(phi, weight, bias, dtype, product_dtype)
            if metrics:  # z − max and exp(z − max) side by side, for the entropy; argmax and entr are slow on CPUs
                z.sub_(z.amax(-1, keepdim=True))
                probs = z.exp()
                total = probs.sum(-1, keepdim=True)
                probs.div_(total)
                log_total = total.log_()[:, 0]
                target = z[pick, y]
                nll = log_total - target
                top1[rows] = target >= 0  # the label's logit is the largest (argmax, but for exact ties)
                # H = −Σ p log p = log Σ exp(z − max) − Σ p (z − max)
                entropy[rows] = log_total - (probs.unsqueeze(1) @ z.unsqueeze(2)).reshape(-1)
            else:
                lse = torch.logsumexp(z, dim=-1, keepdim=True)
                nll = lse[:, 0] - z[pick, y]
                probs = z.sub_(lse).exp_()  # P, in place of Z
            del z
            omega = torch.exp(-nll) if dft else None
            uw = u[rows] if omega is None else u[rows] * omega
            loss += uw @ nll
            # κ on the rows of this chunk that are among the first K (they lead the chunk)
            nk = max(0, min(rows.stop, k_rows) - rows.start)
            krows = slice(rows.start, rows.start + nk)
            g_kappa, combine = None, False
            if nk:
                pk, phik = probs[:nk], phi[:nk]
                ak = kw[krows] if omega is None else kw[krows] * omega[:nk]
                a = ak * phik.pow(2).sum(-1)
                v = _mm(pk, w, product_dtype)
                v_sq = v.pow(2).sum(-1)
                c = torch.mv(pk, row_sq) - v_sq
                kappa += a @ c
                if kappa_targets and any(need):
                    for target, factor in kappa_targets:
                        target.explicit_w(pk, a, v, factor)
                    if through_logits and (kphi or kb or need_w):
                        if kgrads is None:  # G_κ only inside G: formed in P's buffer below, a vocabulary tile at a time
                            combine = True
                        else:
                            g_kappa = _mm(v, w.T, product_dtype).mul_(-2).add_(row_sq)  # S
                            g_kappa.sub_((c - v_sq)[:, None]).mul_(pk).mul_(a[:, None])  # G_κ = a ⊙ P ⊙ (S − p·s)
                    if kgrads is not None:
                        if g_kappa is not None:
                            kgrads.through_z(g_kappa, phik, krows)
                        kgrads.explicit_phi(ak * c, phik, krows, 1.0, through_logits)
            if not any(need):
                continue
            if combine:  # G = P ⊙ (u ω + λ a (S − p·s)) − u ω Y on the κ rows, in place of P
                _combine_in_tiles(probs[:nk], v, w, row_sq, c - v_sq, lam * a, uw[:nk], product_dtype)
                probs[nk:].mul_(uw[nk:, None])
                grad_z = probs
            else:
                grad_z = probs.mul_(uw[:, None])  # G_loss = u ω (P − Y), in place of P
            grad_z[pick, y] -= uw
            del probs
            if g_kappa is not None and lam != 0:
                grad_z[:nk].add_(g_kappa, alpha=lam)
            del g_kappa
            grads.through_z(grad_z, phi, rows)
            if nk and lam != 0:
                grads.explicit_phi(ak * c, phik, krows, lam, through_logits)
            del grad_z
        grads.finish(w)
        if kgrads is not None:
            kgrads.finish(w)
    return loss, kappa, entropy, top1, grads, kgrads


def _combine_in_tiles(probs, v, w, row_sq, ps, la, uw, product_dtype) -> None:
    """``P ← P ⊙ (u ω + λ a (S − p·s))`` with ``S = r − 2 V Wᵀ``, a tile of the vocabulary at a time: the
    ``(rows, tile)`` block of ``S`` stays in cache and no second ``(rows, d)`` buffer is formed."""
    for cols in chunks(w.shape[0], VOCAB_TILE):
        s = _mm(v, w[cols].T, product_dtype)
        s.mul_(-2).add_(row_sq[cols]).sub_(ps[:, None]).mul_(la[:, None]).add_(uw[:, None])
        probs[:, cols].mul_(s)


class _Grads:
    """The gradients w.r.t. ``Φ``, ``W`` and ``b`` that one objective (``L + λκ``, or κ alone) accumulates over the
    chunks, in the compute dtype."""

    def __init__(self, features, w, need_phi, need_w, need_b, product_dtype, *, every_row=True):
        d, self.weight, self.product_dtype = w.shape[0], w, product_dtype
        # L + λκ sets every row of Φ's gradient (through_z on each chunk); κ alone only the first K
        new = torch.empty_like if every_row else torch.zeros_like
        self.phi = new(features, dtype=w.dtype) if need_phi else None
        self.w = torch.empty_like(w) if need_w else None  # set by the first product (no pass to zero it)
        self.w_set = False
        self.b = w.new_zeros(d) if need_b else None
        self.mass = w.new_zeros(d) if need_w else None  # Σ_t factor·a_t p_t, for κ's explicit W factor

    def _add_product(self, a, b, alpha=1.0):
        # W's gradient += alpha · a @ b, in place (no second head-sized tensor per chunk); the first one sets it
        if self.product_dtype is None:
            self.w.addmm_(a, b, alpha=alpha, beta=1 if self.w_set else 0)  # beta=0 ignores the uninitialised memory
        else:
            product = (a.to(self.product_dtype) @ b.to(self.product_dtype)).to(self.w.dtype)
            if self.w_set:
                self.w.add_(product, alpha=alpha)
            else:
                torch.mul(product, alpha, out=self.w)
        self.w_set = True

    def through_z(self, grad_z, phi, rows):
        """``∂/∂Z = grad_z`` on ``rows``: ``grad_z W`` into Φ's, ``grad_zᵀ Φ`` into W's, its column sums into b's."""
        if self.phi is not None:
            self.phi[rows] = _mm(grad_z, self.weight, self.product_dtype)
        if self.w is not None:
            self._add_product(grad_z.T, phi)
        if self.b is not None:
            self.b += grad_z.sum(0)

    def explicit_w(self, pk, a, v, factor):
        """κ's terms in W outside ``Z``, times ``factor``: ``2 diag(Σ_t a_t p_t) W − 2 Pᵀ (a ⊙ V)`` (the first
        collected until :meth:`finish`)."""
        if self.w is not None:
            self.mass.addmv_(pk.T, a, alpha=factor)
            self._add_product(pk.T, v * a[:, None], alpha=-2 * factor)

    def explicit_phi(self, kc, phik, rows, factor, through_logits):
        """κ's term in Φ from ``‖φ_t‖²``: ``2 k_t ω_t c_t φ_t`` times ``factor``, added to rows :meth:`through_z` set."""
        if self.phi is not None and through_logits:
            self.phi[rows].addcmul_(kc[:, None], phik, value=2 * factor)

    def finish(self, w):
        if self.w is not None:
            if not self.w_set:  # no rows
                self.w.zero_()
            self.w.addcmul_(self.mass[:, None], w, value=2)

    def scaled(self, grad):
        """The three gradients times the incoming ``grad`` (in place; ``loss.backward()``'s 1 costs no pass on a
        CPU, where reading it costs no synchronisation)."""
        if grad.device.type == "cpu" and grad.numel() == 1 and float(grad) == 1.0:
            return [self.phi, self.w, self.b]
        return [None if g is None else g.mul_(grad.to(g.dtype)) for g in (self.phi, self.w, self.b)]
