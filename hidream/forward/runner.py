"""The engine's own HiDream transformer forward, at the exact requested size.

diffusers' ``HiDreamImageTransformer2DModel.forward`` pads every non-square latent to
``max_seq`` (4096) tokens with a key mask, so 1024x768 costs as much as 1024x1024 and
1024x1536 does not fit at all; and none of diffusers' cache hooks attach to HiDream's
block lists. This module owns the forward *order* and calls diffusers' own modules
(embedders, blocks, final layer) for everything else, so it cannot drift from diffusers'
numerics: on square inputs the output equals diffusers' forward (tested, fp32 <= 1e-5).

Forward order (diffusers names)::

    temb  = t_embedder(t) + p_embedder(pooled)
    text  = caption_projection[i](llama[llama_layers[i]]), caption_projection[-1](t5)
    txt0  = cat(t5_proj, llama_proj[-1])                       # the "initial" text stream
    double block i: (img, txt) = block(img, cat(txt, llama_i)); txt cut back to len(txt0)
    single block j: h = block(cat(img, txt, llama_{D+j}));      cut back to img + txt
    out = unpatchify(final_layer(img, temb))    # the pipeline negates it afterwards

Hook points for the caches (``hidream.cache.policy``): ``prepare`` -> ``run_blocks(start, end)`` over
one flat index of double-then-single blocks -> ``finish``. A cache policy receives the
runner and the prepared context and decides which block ranges to run.

MoE layers run in the static, sync-free ``grouped`` layout (``hidream.forward.moe``: grouped GEMMs
over the routed tokens, diffusers' FLOPs), so at a fixed size the whole forward makes no host sync (``hidream.forward.syncs`` counts them; tested) and a
cache decision reads one scalar. With ``compile="blocks"`` every block runs through one
regionally compiled callable per block class (``hidream.forward.compile``). Where grouped_mm would
sync (CUDA other than bf16 on compute capability 9.x/10.x) or cannot compute the experts
exactly (LoRA wrappers), compiled blocks use the ``dense`` layout (1.75x the expert FLOPs, no
sync) and eager runs diffusers' own MoE. Eager runs on the CPU take diffusers' MoE too: there a
host read is free and its per-expert matmuls beat ``grouped_mm``'s CPU kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .compile import BlockCaller
from .moe import StaticMoE


@dataclass
class ForwardContext:
    """Everything the blocks need for one forward call; built once by ``prepare``.

    ``img`` and ``txt`` are the streams *entering* the blocks (after the patch embedder and
    caption projections); ``temb`` is the timestep+pooled embedding that TeaCache watches.
    """

    img: torch.Tensor
    txt: torch.Tensor
    temb: torch.Tensor
    llama: list[torch.Tensor]
    rope: torch.Tensor
    grid: tuple[int, int]
    batch: int
    t_emb: torch.Tensor | None = None  # the timestep embedding alone (TeaCache on Full watches it)


CachePolicy = Callable[["TransformerRunner", ForwardContext], torch.Tensor]


def patchify(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C] in diffusers' token layout, any aspect ratio."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """Inverse of ``patchify``: [B, gh*gw, p*p*C] -> [B, C, gh*p, gw*p]."""
    b, _, f = tokens.shape
    gh, gw = grid
    c = f // (patch * patch)
    x = tokens.reshape(b, gh, gw, patch, patch, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, gh * patch, gw * patch)


def image_ids(grid: tuple[int, int], batch: int, device: torch.device) -> torch.Tensor:
    """Position ids (0, row, col) per image token, as diffusers builds them for square inputs."""
    gh, gw = grid
    ids = torch.zeros(gh, gw, 3, device=device)
    ids[..., 1] = ids[..., 1] + torch.arange(gh, device=device)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(gw, device=device)[None, :]
    return ids.reshape(gh * gw, 3).unsqueeze(0).repeat(batch, 1, 1)


class BlockRunner:
    """The block loop both runners share: HiDream's block order over one flat index (the module
    doc), each block with its MoE static and, when asked, compiled. This engine's runner
    (diffusers' blocks) and ``hidream.native.runner`` (ComfyUI's) differ only in ``call_block``:
    how one block is called (a double block returns ``(img, txt)``, a single one the joined
    stream). Subclasses set ``_moe`` (a ``StaticMoE`` over ``_blocks``, or None)."""

    _moe: StaticMoE | None = None

    def __init__(self, model: torch.nn.Module, compile: str) -> None:
        """``model``: a HiDream transformer, diffusers' or ComfyUI's (the same block lists)."""
        double = list(model.double_stream_blocks)
        self.num_double = len(double)
        self._blocks = double + list(model.single_stream_blocks)  # one flat index, as run_blocks takes
        self.num_blocks = len(self._blocks)
        self._caller = BlockCaller(compile)

    @property
    def compiled(self) -> bool:
        """True while blocks run through the compiled callable (False after a fallback)."""
        return bool(self._caller.compiled)

    def _call(self, idx: int, **kwargs) -> object:
        """Block ``idx`` (flat index) with its MoE static and, when asked, compiled."""
        block = self._blocks[idx]
        if self._moe is None:
            return self._caller(block, **kwargs)
        with self._moe.active(idx):
            return self._caller(block, **kwargs)

    def call_block(
        self, idx: int, ctx: ForwardContext, tokens: torch.Tensor, text: torch.Tensor | None = None
    ):
        """Block ``idx`` on ``tokens`` (and ``text`` for a double block): each runner's own."""
        raise NotImplementedError(f"{type(self).__name__} does not say how to call a block")

    def run_blocks(
        self, ctx: ForwardContext, start: int, end: int, img: torch.Tensor, txt: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run flat blocks ``start``..``end``-1 (double blocks first, then single blocks).

        Returns the image and text streams after the range, so a cache can store the
        residual of any range and replay it later.
        """
        n_txt = txt.shape[1]
        for idx in range(start, min(end, self.num_double)):
            img, txt = self.call_block(idx, ctx, img, torch.cat([txt, ctx.llama[idx]], dim=1))
            txt = txt[:, :n_txt]
        first_single = max(start, self.num_double)
        if first_single >= end:
            return img, txt
        n_img = img.shape[1]
        hidden = torch.cat([img, txt], dim=1)
        seq = hidden.shape[1]
        for idx in range(first_single, end):
            hidden = self.call_block(idx, ctx, torch.cat([hidden, ctx.llama[idx]], dim=1))[:, :seq]
        return hidden[:, :n_img], hidden[:, n_img:]


class TransformerRunner(BlockRunner):
    """Runs a diffusers ``HiDreamImageTransformer2DModel`` block by block.

    The runner holds no per-call state, so one instance can serve any number of calls.

    Args:
        transformer: the shared diffusers transformer; never modified (the MoE swap is
            undone after each block call).
        moe: ``auto`` (default: ``grouped``; where grouped_mm would sync or cannot run, e.g.
            LoRA wrappers on the experts, ``dense`` with ``compile="blocks"``, else diffusers'
            own MoE, which eager runs also take on the CPU, where a host read costs nothing and
            its per-expert matmuls are faster), ``grouped``, ``dense`` or ``gather`` (the static layouts of
            ``hidream.forward.moe``; ``grouped`` falls back to ``dense``), or None for diffusers' own
            MoE (one host sync per MoE layer).
        compile: ``off`` or ``blocks`` (regional compile, ``hidream.forward.compile``).
    """

    def __init__(self, transformer: torch.nn.Module, moe: str | None = "auto", compile: str = "off") -> None:
        super().__init__(transformer, compile)
        self.transformer = transformer
        self.config = transformer.config
        fallback, eager_auto = "dense", moe == "auto" and compile != "blocks"
        if moe == "auto":  # eager: diffusers' MoE where grouped would sync, and on the CPU
            moe, fallback = "grouped", ("diffusers" if eager_auto else "dense")
        self._moe = StaticMoE(self._blocks, moe, fallback, keep_on_cpu=eager_auto) if moe is not None else None

    def prepare(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        t5: torch.Tensor,
        llama: torch.Tensor,
        pooled: torch.Tensor,
    ) -> ForwardContext:
        """Embed the latents, timestep and text; build the rotary embedding."""
        tr = self.transformer
        patch = self.config.patch_size
        batch = latents.shape[0]
        grid = (latents.shape[-2] // patch, latents.shape[-1] // patch)
        img = tr.x_embedder(patchify(latents, patch))
        t_emb = tr.t_embedder(timesteps, latents.dtype)
        temb = t_emb + tr.p_embedder(pooled)
        dim = img.shape[-1]
        llama_proj = [
            tr.caption_projection[i](llama[k]).view(batch, -1, dim)
            for i, k in enumerate(self.config.llama_layers)
        ]
        t5_proj = tr.caption_projection[-1](t5).view(batch, -1, dim)
        txt = torch.cat([t5_proj, llama_proj[-1]], dim=1)
        ids = image_ids(grid, batch, img.device)
        txt_ids = torch.zeros(
            batch, txt.shape[1] + llama_proj[0].shape[1], 3, device=ids.device, dtype=ids.dtype
        )
        rope = tr.pe_embedder(torch.cat([ids, txt_ids], dim=1))
        return ForwardContext(
            img=img, txt=txt, temb=temb, llama=llama_proj, rope=rope, grid=grid, batch=batch, t_emb=t_emb
        )

    def call_block(
        self, idx: int, ctx: ForwardContext, tokens: torch.Tensor, text: torch.Tensor | None = None
    ):
        """Block ``idx`` (flat index): a double block on the image tokens and ``text`` (the text
        stream with its Llama layer), or a single block on the joined streams (``text`` None)."""
        return self._call(
            idx,
            hidden_states=tokens,
            hidden_states_masks=None,
            encoder_hidden_states=text,
            temb=ctx.temb,
            image_rotary_emb=ctx.rope,
        )

    def finish(self, ctx: ForwardContext, img: torch.Tensor) -> torch.Tensor:
        """Final layer on the image tokens, back to [B, C, H, W] (not negated)."""
        out = self.transformer.final_layer(img, ctx.temb)
        return unpatchify(out, ctx.grid, self.config.patch_size)

    def forward(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        t5: torch.Tensor,
        llama: torch.Tensor,
        pooled: torch.Tensor,
        policy: CachePolicy | None = None,
    ) -> torch.Tensor:
        """Same result as the diffusers forward (without its padding), optionally cached.

        ``policy(runner, ctx)`` returns the image tokens after all blocks; without one,
        every block runs.
        """
        ctx = self.prepare(latents, timesteps, t5, llama, pooled)
        if policy is None:
            img, _ = self.run_blocks(ctx, 0, self.num_blocks, ctx.img, ctx.txt)
        else:
            img = policy(self, ctx)
        return self.finish(ctx, img)
