"""GradCache: a contrastive batch larger than memory, with exactly the gradients of the whole batch.

In-batch negatives make the loss of every pair depend on every embedding, so a batch cannot simply
be split into micro-batches with gradient accumulation (each would see only its own negatives).
GradCache (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup") splits the *graph* instead of the loss:

    1. embed every chunk k with no graph:            e^k = f_θ(x^k)
    2. loss on the whole cached batch, e as leaves:   L(e^1…e^K), g^k = ∂L/∂e^k
    3. for each chunk, embed again with a graph and backpropagate g^k:  ∂L/∂θ = Σ_k (∂e^k/∂θ)ᵀ g^k

Step 3 is the chain rule, so the gradients equal those of one full-batch backward; peak memory is
that of one chunk's graph plus the (B, dim) embeddings. The price is a second forward per chunk.

Design choices:
- The RNG state is captured before each chunk's first forward and restored for its replay (as
  `torch.utils.checkpoint` does), so dropout draws the same masks twice and the replayed embeddings
  are the cached ones; the caller's RNG stream continues as after the first pass.
- The loss function is the caller's `loss_fn(a, b) -> (loss, stats)` on the full cached batch, so
  task masks, STW weights and cross-worker gathering stay where they are (vipoly.losses).
- Under DDP, gradients are all-reduced only with the last chunk's backward (`no_sync` before it).
- A chunk is whatever the embedder takes: a padded batch from `InputBuilder.pad` or a packed one
  from `InputBuilder.pack`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

Chunk = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], tuple[Tensor, Any]]


def embed_chunk(model: nn.Module, chunk: Chunk) -> Tensor:
    """The default embedding function: a PolyEmbedder (or a DDP wrapper of one) → (n, dim)."""
    return model(**chunk).embedding


class _RngState:
    """The CPU RNG and, where CUDA is initialised, every CUDA device's RNG, captured now."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    @contextlib.contextmanager
    def restored(self):
        """Run a block from this state; the RNG continues afterwards as before the block."""
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def embed_cached(model: nn.Module, chunks: Sequence[Chunk], embed: Callable[[nn.Module, Chunk], Tensor] = embed_chunk,
                 capture_rng: bool = True) -> tuple[list[Tensor], list["_RngState | None"]]:
    """Step 1: each chunk's embeddings with no graph, and the RNG state its forward started from."""
    states: list[_RngState | None] = []
    cached = []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_RngState() if capture_rng else None)
            cached.append(embed(model, chunk).detach())
    return cached, states


def replay(model: nn.Module, chunks: Sequence[Chunk], states: Sequence["_RngState | None"], grads: Sequence[Tensor],
           backward: Callable[[Tensor, Tensor, bool], None] | None = None,
           embed: Callable[[nn.Module, Chunk], Tensor] = embed_chunk) -> None:
    """Step 3: each chunk embedded again, with a graph and its first pass's RNG, and its cached
    gradient sent back through it: `backward(e, grad, last)` (default: autograd, under DDP's
    `no_sync` but for the last chunk). A distributed engine passes its own (vipoly.train.engine)."""
    for i, (chunk, state, grad) in enumerate(zip(chunks, states, grads)):
        last = i == len(chunks) - 1
        rng = state.restored() if state is not None else contextlib.nullcontext()
        with rng:
            e = embed(model, chunk)
            # d/dθ Σ (e · g) = (∂e/∂θ)ᵀ g: the chain rule through the cached embedding-gradient.
            if backward is not None:
                backward(e, grad.to(e.dtype), last)
                continue
            sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                torch.autograd.backward(e, grad_tensors=grad.to(e.dtype))


def gradcache_step(model: nn.Module, chunks_q: Sequence[Chunk], chunks_p: Sequence[Chunk], loss_fn: LossFn,
                   embed: Callable[[nn.Module, Chunk], Tensor] = embed_chunk,
                   capture_rng: bool = True) -> tuple[Tensor, Any]:
    """One GradCache forward/backward over query chunks and positive chunks → (loss, stats).

    Rows of the full batch are the chunks' rows concatenated in order: a = [e_q^1; …; e_q^K],
    b = [e_p^1; …; e_p^M] (K and M may differ; a and b must end with the same number of rows when
    `loss_fn` pairs them). Leaves the parameters' `.grad` holding ∂L/∂θ (accumulated, as `backward`
    does); the optimizer step is the caller's. `capture_rng=False` skips the RNG bookkeeping for
    models without randomness (eval mode, no dropout).
    """
    if not chunks_q or not chunks_p:
        raise ValueError("gradcache_step: chunks_q and chunks_p must each hold at least one chunk")
    chunks = [*chunks_q, *chunks_p]
    cached, states = embed_cached(model, chunks, embed, capture_rng)
    a = torch.cat(cached[:len(chunks_q)]).requires_grad_()
    b = torch.cat(cached[len(chunks_q):]).requires_grad_()
    loss, stats = loss_fn(a, b)
    loss.backward()
    grads = [*a.grad.split([len(e) for e in cached[:len(chunks_q)]]),
             *b.grad.split([len(e) for e in cached[len(chunks_q):]])]
    replay(model, chunks, states, grads, embed=embed)
    return loss.detach(), stats


class CachedBatch:
    """GradCache for one training micro-batch (`train.gradcache_chunk`): `chunks` are (inputs, rows,
    negatives) as `TrainStream` cuts them, each holding its rows' queries, positives and hard
    negatives. `embedding` is the whole batch laid out as one forward would give it (all queries,
    all positives, all negatives), a leaf with no graph behind it; after the loss, `backward(loss)`
    replays the chunks through `backward_chunk(e, grad, last)` (the engine's: DDP or DeepSpeed)."""

    def __init__(self, model: nn.Module, chunks: Sequence[tuple[Chunk, int, int]], device: torch.device):
        from vipoly.train.monitor import pooling_entropy

        self.model = model
        self.inputs = [inputs for inputs, _, _ in chunks]
        entropies = []

        def embed(m: nn.Module, chunk: Chunk) -> Tensor:
            out = m(**{k: v.to(device) for k, v in chunk.items()})
            if not torch.is_grad_enabled():  # the first pass: the step's pooling entropy
                entropies.append(pooling_entropy(out.pooling_weights, out.attention_mask) * len(out.embedding))
            return out.embedding

        self._embed = embed
        cached, self.states = embed_cached(model, self.inputs, embed)
        self.entropy = sum(entropies) / sum(len(e) for e in cached)
        # Where each chunk's rows go in the batch layout: its queries, positives, negatives.
        rows, negs = sum(r for _, r, _ in chunks), sum(m for _, _, m in chunks)
        places, q, m = [], 0, 0
        for _, r, k in chunks:
            places.append(torch.cat([torch.arange(q, q + r), torch.arange(rows + q, rows + q + r),
                                     torch.arange(2 * rows + m, 2 * rows + m + k)]))
            q, m = q + r, m + k
        self.places = places
        order = torch.cat(places)
        layout = torch.empty_like(order)
        layout[order] = torch.arange(len(order))
        self.embedding = torch.cat(cached)[layout.to(cached[0].device)].requires_grad_()

    def backward(self, loss: Tensor, backward_chunk: Callable[[Tensor, Tensor, bool], None]) -> None:
        loss.backward()
        grad = self.embedding.grad
        grads = [grad[p.to(grad.device)] for p in self.places]
        replay(self.model, self.inputs, self.states, grads, backward_chunk, self._embed)
